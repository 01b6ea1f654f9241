"""Where the networks come from: local files in their real formats, loaded by one code path.

`ComponentPaths` names a diffusers base-model directory (UNet, VAE, text encoder, tokenizer,
scheduler), an OpenCLIP (or transformers) vision checkpoint and a face-backbone file. The SD1.5
configs point it at real weights; the embedded default (`src.tiny`) writes tiny random models in
exactly those formats and points it at them, so the loading code is the same.

Also here: the SD1.5-compatible CLIP tokenizer built offline from the BPE vocabulary that ships
inside open_clip, and SD1.5's training noise schedule. The embedded default's tiny architectures live
in `src.tiny.architectures`.
"""
from __future__ import annotations

import gzip
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from src.models.clip_encoder import ClipPatchEncoder
from src.models.face_backbone import IRBackbone, load_face_backbone

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The pretrained (frozen) networks UniPortrait is built on."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    clip: ClipPatchEncoder
    face: IRBackbone


def _require(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: '{p}' (set it in the config's components section)")
    return p


class ComponentPaths:
    """Local paths of the base networks, validated before any long work starts.

    Args:
        base_model: diffusers model directory with unet/, vae/, text_encoder/, tokenizer/, scheduler/.
        clip_checkpoint: OpenCLIP checkpoint file (or a transformers CLIPVisionModelWithProjection
            directory when clip_format is "transformers").
        face_backbone: face-recognition backbone state dict (TFace/CurricularFace layout).
        clip_model: open_clip model name (architecture of clip_checkpoint), e.g. "ViT-H-14".
        clip_vision_config: a custom open_clip vision config instead of a named model (tiny preset).
        clip_embed_dim: the custom tower's embedding dim (only with clip_vision_config).
        face_num_layers, face_widths, face_embedding_size: the IR backbone's architecture.
    """

    def __init__(
        self,
        base_model: str,
        clip_checkpoint: str,
        face_backbone: str,
        clip_model: str = "ViT-H-14",
        clip_format: Literal["open_clip", "transformers"] = "open_clip",
        clip_vision_config: dict[str, Any] | None = None,
        clip_embed_dim: int = 1024,
        face_num_layers: int = 100,
        face_widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        face_embedding_size: int = 512,
    ) -> None:
        self.base_model = base_model
        self.clip_checkpoint = clip_checkpoint
        self.face_backbone = face_backbone
        self.clip_model = clip_model
        self.clip_format = clip_format
        self.clip_vision_config = clip_vision_config
        self.clip_embed_dim = clip_embed_dim
        self.face_num_layers = face_num_layers
        self.face_widths = tuple(face_widths)
        self.face_embedding_size = face_embedding_size

    def validate(self) -> None:
        """Fail fast, naming the missing path, before anything is loaded."""
        base = _require(self.base_model, "components.base_model (diffusers directory)")
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            _require(base / sub, f"components.base_model/{sub}")
        _require(self.clip_checkpoint, "components.clip_checkpoint")
        _require(self.face_backbone, "components.face_backbone")

    def build(self) -> Components:
        self.validate()
        base = Path(self.base_model)
        load = dict(local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **load)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **load)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **load)
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **load)
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **load)
        if self.clip_format == "transformers":
            clip = ClipPatchEncoder.from_transformers(self.clip_checkpoint)
        elif self.clip_vision_config is not None:
            clip = ClipPatchEncoder.from_open_clip_vision_config(
                self.clip_vision_config, self.clip_embed_dim, checkpoint=self.clip_checkpoint
            )
        else:
            clip = ClipPatchEncoder.from_open_clip(self.clip_checkpoint, model_name=self.clip_model)
        face = load_face_backbone(
            self.face_backbone,
            num_layers=self.face_num_layers,
            widths=self.face_widths,
            embedding_size=self.face_embedding_size,
        )
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False).eval()
        return Components(unet, vae, text_encoder, tokenizer, scheduler, clip, face)


# --------------------------------------------------------------------------------------------
# Tokenizer: SD1.5's CLIP BPE, built offline from the vocabulary open_clip ships.
# --------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json + merges.txt of the OpenAI CLIP BPE (49408 tokens, as SD1.5's tokenizer)
    from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`, and load it as a CLIPTokenizer."""
    import open_clip.tokenizer as oct

    bpe_path = Path(oct.default_bpe())
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # the same slice open_clip and OpenAI CLIP use
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length, pad_token="<|endoftext|>"
    )
    tok.save_pretrained(out)
    return tok


def sd15_scheduler() -> DDPMScheduler:
    """SD1.5's training noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps, epsilon)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
    )
