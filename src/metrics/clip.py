"""CLIP-T (image-text) and CLIP-I (image-image) scores through open_clip, cosine x 100 as in the tables.

The model comes from a LOCAL checkpoint (`load_open_clip`); nothing is downloaded. The paper uses
ViT-L/14 for CLIP-T. Scores are the raw cosine x 100 (not clamped at 0, unlike torchmetrics'
CLIPScore).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics import Metric

from src.conventions import CLIP_MEAN, CLIP_STD
from src.metrics.face import ImageBatch, images_to_uint8

Preprocess = Callable[[Image.Image], Tensor]  # PIL image -> (3, S, S) normalised pixels
Tokenizer = Callable[[list[str]], Tensor]  # texts -> (B, L) token ids


def load_open_clip(model_name: str, checkpoint: str | Path,
                   device: str = "cpu") -> tuple[nn.Module, Preprocess, Tokenizer]:
    """(model in eval mode, eval preprocess, tokenizer) for an open_clip architecture name (e.g.
    "ViT-L-14") with weights from a local open_clip checkpoint (.bin / .pt state dict or .safetensors).

    The tokenizer of OpenAI-style models (open_clip's SimpleTokenizer with its packaged BPE vocabulary)
    needs no network.
    """
    import open_clip

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip checkpoint for {model_name!r} not found: {path}")
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r} (checkpoint {path})")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def default_preprocess(model: nn.Module) -> Preprocess:
    """open_clip's eval transform for the model's vision tower (size and mean/std from its config)."""
    import open_clip

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", model.visual.image_size)
    return open_clip.image_transform(size, is_train=False, mean=cfg.get("mean", CLIP_MEAN),
                                     std=cfg.get("std", CLIP_STD))


class ClipScore(Metric):
    """Mean CLIP-T and CLIP-I (cosine x 100) of generated images.

    update(images, texts=None, references=None):
        images:     list of B uint8 (H, W, 3) arrays, or a (B, 3, H, W) tensor in [-1, 1].
        texts:      B prompts -> CLIP-T (needs a tokenizer).
        references: B reference images (same forms as `images`) -> CLIP-I.
    All images go through `preprocess` (open_clip's eval transform on PIL images, the protocol used by
    the published numbers). compute() -> {"clip_t": ..., "clip_i": ...} as 0-d tensors; a score that
    never received data is left out. Sum states: DDP-safe.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, model: nn.Module, preprocess: Preprocess | None = None, tokenizer: Tokenizer | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.model = model.eval()  # embeddings are taken under no_grad
        self.preprocess = preprocess or default_preprocess(model)
        self.tokenizer = tokenizer
        for name in ("t_sum", "t_num", "i_sum", "i_num"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: ImageBatch) -> Tensor:
        """Images -> (B, E) L2-normalised CLIP image embeddings."""
        pixels = torch.stack([self.preprocess(Image.fromarray(a)) for a in images_to_uint8(images)])  # (B, 3, S, S)
        return F.normalize(self.model.encode_image(pixels.to(self.model_device())).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> (B, E) L2-normalised CLIP text embeddings."""
        if self.tokenizer is None:
            raise ValueError("ClipScore got texts but was built without a tokenizer")
        tokens = self.tokenizer(list(texts)).to(self.model_device())  # (B, L)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def update(
        self, images: ImageBatch, texts: Sequence[str] | None = None, references: ImageBatch | None = None
    ) -> None:
        emb = self.embed_images(images)  # (B, E)
        if texts is not None:
            if len(texts) != len(emb):
                raise ValueError(f"{len(emb)} images but {len(texts)} texts")
            self.t_sum += 100 * (emb * self.embed_texts(texts)).sum(-1).double().sum()
            self.t_num += len(emb)
        if references is not None:
            ref = self.embed_images(references)  # (B, E)
            if len(ref) != len(emb):
                raise ValueError(f"{len(emb)} images but {len(ref)} reference images")
            self.i_sum += 100 * (emb * ref).sum(-1).double().sum()
            self.i_num += len(emb)

    def compute(self) -> dict[str, Tensor]:
        out = {}
        if self.t_num > 0:
            out["clip_t"] = (self.t_sum / self.t_num).float()
        if self.i_num > 0:
            out["clip_i"] = (self.i_sum / self.i_num).float()
        return out
