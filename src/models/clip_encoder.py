"""Frozen CLIP image tower -> penultimate-layer patch tokens (UniPortrait's CLIP local features).

Two back-ends give the same features:

- open_clip ``VisionTransformer`` (ViT-H/14 for SD1.5, or a tiny custom tower): patch embedding,
  class token, positional embedding, patch dropout (identity in eval), ``ln_pre``, then every
  residual block but the last (open_clip 3.3.0 ``VisionTransformer._embeds`` + ``transformer``);
- transformers ``CLIPVisionModelWithProjection`` (IP-Adapter's ``image_encoder`` directory):
  ``hidden_states[-2][:, 1:]``.

The class token is removed and the tokens are not normalised (no ``ln_post``, no projection).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from torch import nn

from src.models.face_backbone import describe_key_mismatch, freeze, read_state_dict

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPVisionModelWithProjection


def _unwrap_open_clip_state(obj: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """Full open_clip checkpoint -> its ``visual.`` part with the prefix removed.

    Accepts a plain state dict or {"state_dict": ...}, with or without DDP ``module.`` prefixes.
    """
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{path}: no 'visual.' keys; first keys are {list(state)[:5]}")
    return visual


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    """.safetensors, or .pt/.bin/.pth via torch.load(weights_only=True); may hold {'state_dict': ...}."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return read_state_dict(path)  # raises FileNotFoundError for a missing file
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _is_transformers_clip_vision(tower: nn.Module) -> TypeGuard[CLIPVisionModelWithProjection]:
    """isinstance check that imports transformers (slow) only when the tower is not open_clip's."""
    from transformers import CLIPVisionModelWithProjection

    return isinstance(tower, CLIPVisionModelWithProjection)


class ClipPatchEncoder(nn.Module):
    """Frozen CLIP vision tower returning penultimate patch tokens (B, grid*grid, width).

    Build with ``from_open_clip``, ``from_open_clip_vision_config`` or ``from_transformers``;
    the wrapped tower is frozen and kept in eval mode (``train()`` does not unfreeze it).
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if isinstance(tower, VisionTransformer):
            self.backend = "open_clip"
            self._width = int(tower.transformer.width)
            self._image_size = int(tower.image_size[0])
            self._patch = int(tower.patch_size[0])
            if tower.image_size[0] != tower.image_size[1] or tower.patch_size[0] != tower.patch_size[1]:
                raise ValueError(
                    f"only square towers are supported, got image {tower.image_size} patch {tower.patch_size}"
                )
            if len(tower.transformer.resblocks) < 2:
                raise ValueError("the tower needs at least 2 transformer layers to have a penultimate layer")
        elif _is_transformers_clip_vision(tower):
            self.backend = "transformers"
            cfg = tower.config
            self._width = int(cfg.hidden_size)
            self._image_size = int(cfg.image_size)
            self._patch = int(cfg.patch_size)
            if cfg.num_hidden_layers < 2:
                raise ValueError("the tower needs at least 2 transformer layers to have a penultimate layer")
        else:
            raise TypeError(
                f"ClipPatchEncoder wraps an open_clip VisionTransformer or a transformers "
                f"CLIPVisionModelWithProjection, got {type(tower).__name__}"
            )
        self.tower = freeze(tower)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_open_clip(
        cls, checkpoint: str | Path, model_name: str = "ViT-H-14", model_kwargs: dict[str, Any] | None = None
    ) -> ClipPatchEncoder:
        """Built-in open_clip model ``model_name`` with weights from a local full-CLIP checkpoint file.

        ``model_kwargs`` override the built-in config (e.g. ``embed_dim``/``vision_cfg``/``text_cfg``),
        as in ``open_clip.create_model``. Never touches the network (``pretrained`` is a file path).
        """
        import open_clip

        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip checkpoint not found: {path}")
        try:
            model = open_clip.create_model(model_name, pretrained=str(path), **(model_kwargs or {}))
        except RuntimeError as err:  # strict load failure inside open_clip: name the file and model
            raise ValueError(f"{path}: cannot load as open_clip {model_name!r}: {err}") from err
        return cls(model.visual)

    @classmethod
    def from_open_clip_vision_config(
        cls,
        vision_cfg: dict[str, Any],
        embed_dim: int,
        checkpoint: str | Path | None = None,
        quick_gelu: bool = False,
    ) -> ClipPatchEncoder:
        """Custom open_clip vision tower (e.g. the tiny preset's), optionally with weights.

        Args:
            vision_cfg: fields of ``open_clip.model.CLIPVisionCfg`` (image_size, patch_size, width,
                layers, head_width, mlp_ratio, ...).
            embed_dim: the CLIP joint embedding dim (size of the tower's ``proj``).
            checkpoint: optional full-CLIP state dict (``visual.``-prefixed keys, optionally in
                {"state_dict": ...} with ``module.`` prefixes), .pt/.bin or .safetensors; the
                ``visual.`` part is loaded strictly.
            quick_gelu: QuickGELU activations (OpenAI-trained towers).
        """
        from open_clip.model import _build_vision_tower

        tower = _build_vision_tower(embed_dim, dict(vision_cfg), quick_gelu=quick_gelu)
        if checkpoint is not None:
            state = _unwrap_open_clip_state(_read_checkpoint(checkpoint), checkpoint)
            result = tower.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(
                    describe_key_mismatch(checkpoint, [f"visual.{k}" for k in result.missing_keys],
                                          [f"visual.{k}" for k in result.unexpected_keys])
                    + f" (vision_cfg={vision_cfg}, embed_dim={embed_dim})"
                )
        return cls(tower)

    @classmethod
    def from_transformers(cls, directory: str | Path) -> ClipPatchEncoder:
        """A ``CLIPVisionModelWithProjection.save_pretrained`` directory (e.g. IP-Adapter's image_encoder)."""
        from transformers import CLIPVisionModelWithProjection

        path = Path(directory)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not a transformers model directory (no config.json): {path}")
        return cls(CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True))

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        """Token dim (1280 for ViT-H/14)."""
        return self._width

    @property
    def image_size(self) -> int:
        """Input side in pixels (224 for ViT-H/14)."""
        return self._image_size

    @property
    def grid(self) -> int:
        """Patches per side (16 for ViT-H/14 at 224)."""
        return self._image_size // self._patch

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def train(self, mode: bool = True) -> ClipPatchEncoder:
        """The tower stays in eval mode (frozen encoder); only the wrapper's flag changes."""
        super().train(mode)
        self.tower.eval()
        return self

    # ------------------------------------------------------------------ forward
    def _open_clip_penultimate(self, pixels: torch.Tensor) -> torch.Tensor:
        """open_clip 3.3.0 VisionTransformer.forward up to (not including) the last block."""
        vt = cast("VisionTransformer", self.tower)  # backend "open_clip"
        x = vt._embeds(pixels)  # conv1 -> class token -> pos emb -> patch_dropout -> ln_pre; (B, 1+N, W)
        tr = vt.transformer
        if not tr.batch_first:
            x = x.transpose(0, 1)  # (1+N, B, W)
        for block in tr.resblocks[:-1]:
            x = block(x)
        if not tr.batch_first:
            x = x.transpose(0, 1)
        return x  # (B, 1+N, W)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, S, S) CLIP-normalised (``to_clip_pixels``), S = image_size
        -> (B, grid*grid, width) penultimate-layer patch tokens, class token removed."""
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"ClipPatchEncoder expects (B, 3, {s}, {s}) pixels, got {tuple(pixels.shape)}")
        if self.backend == "open_clip":
            hidden = self._open_clip_penultimate(pixels)  # (B, 1+N, W)
        else:
            out = self.tower(pixel_values=pixels, output_hidden_states=True)
            hidden = out.hidden_states[-2]  # (B, 1+N, W)
        return hidden[:, 1:]  # (B, N, W)
