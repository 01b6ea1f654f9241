"""Where the networks come from: local files in their real formats, loaded by one code path.

`ComponentPaths` names a diffusers base-model directory (UNet, VAE, text encoder, tokenizer,
scheduler), an OpenCLIP (or transformers) vision checkpoint and a face-backbone file. The SD1.5
configs point it at real weights; the embedded default (`src.tiny`) writes tiny random models in
exactly those formats and points it at them, so the loading code is the same.

The base model's architecture is read from the directory (`detect_arch`): an SDXL directory has a
second text encoder and tokenizer (`text_encoder_2/`, `tokenizer_2/`, model_index.json's `_class_name`
`StableDiffusionXLPipeline` when present); `Components.arch` is then "sdxl", else "sd15". How the two
architectures condition the UNet on text is `src.models.conditioning`.

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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from src.models.clip_encoder import ClipPatchEncoder
from src.models.conditioning import check_text_conditioning
from src.models.face_backbone import IRBackbone, load_face_backbone

log = logging.getLogger(__name__)

Arch = Literal["sd15", "sdxl"]
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")
SDXL_PIPELINE = "StableDiffusionXLPipeline"


@dataclass
class Components:
    """The pretrained (frozen) networks UniPortrait is built on. `text_encoder_2` (SDXL's
    CLIPTextModelWithProjection, whose `text_embeds` are the pooled condition) and `tokenizer_2`
    are None on SD1.5."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    clip: ClipPatchEncoder
    face: IRBackbone
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL: whether an empty negative prompt is zero text states and pooled embedding (model_index.json's
    # `force_zeros_for_empty_prompt`: true for SDXL base 1.0, false for models trained on encoded "")
    force_zeros_for_empty_prompt: bool = True

    @property
    def arch(self) -> Arch:
        """The architecture: "sdxl" when a second text encoder is present, else "sd15"."""
        return "sd15" if self.text_encoder_2 is None else "sdxl"

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, ...]:
        """The text encoders in conditioning order: (text_encoder,) or (text_encoder, text_encoder_2)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """The tokenizers matching `text_encoders`."""
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)


def _require(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: '{p}' (set it in the config's components section)")
    return p


def model_index(base: Path) -> dict[str, Any]:
    """The base model's model_index.json (diffusers' pipeline description), {} when it has none."""
    index = base / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def detect_arch(base_model: str | Path) -> Arch:
    """The architecture of a diffusers base-model directory: "sdxl" when it holds text_encoder_2/ and
    tokenizer_2/, else "sd15". A directory that is half SDXL (one of the two subfolders, or model_index.json
    naming StableDiffusionXLPipeline without them) is an error naming what is missing; so is an SDXL layout
    whose model_index.json names another pipeline class."""
    base = Path(base_model).expanduser()
    present = [sub for sub in SDXL_SUBFOLDERS if (base / sub).is_dir()]
    index = base / "model_index.json"
    class_name = model_index(base).get("_class_name")
    if class_name == SDXL_PIPELINE or present:
        for sub in SDXL_SUBFOLDERS:
            why = f"{index} names {SDXL_PIPELINE}" if class_name == SDXL_PIPELINE else f"{base} has {present[0]}/"
            _require(base / sub, f"components.base_model/{sub} (SDXL: {why})")
        if class_name is not None and class_name != SDXL_PIPELINE:
            raise ValueError(f"{base} has the SDXL subfolders {SDXL_SUBFOLDERS} but {index} names '{class_name}', "
                             f"not {SDXL_PIPELINE}")
        return "sdxl"
    return "sd15"


class ComponentPaths:
    """Local paths of the base networks, validated before any long work starts.

    Args:
        base_model: diffusers model directory with unet/, vae/, text_encoder/, tokenizer/, scheduler/
            (SD1.5), plus text_encoder_2/ and tokenizer_2/ (SDXL, see `detect_arch`).
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

    @property
    def arch(self) -> Arch:
        """The base model's architecture, read from its directory (`detect_arch`; nothing is loaded)."""
        return detect_arch(_require(self.base_model, "components.base_model (diffusers directory)"))

    def validate(self) -> None:
        """Fail fast, naming the missing path, before anything is loaded."""
        base = _require(self.base_model, "components.base_model (diffusers directory)")
        for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            _require(base / sub, f"components.base_model/{sub}")
        detect_arch(base)  # names a missing SDXL subfolder
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
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **load)  # the schedule on disk
        text_encoder_2 = tokenizer_2 = None
        if detect_arch(base) == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **load)
            tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **load)
        encoders = (text_encoder,) if text_encoder_2 is None else (text_encoder, text_encoder_2)
        check_text_conditioning(unet, encoders, where=str(base))
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
        for m in (unet, vae, *encoders):
            m.requires_grad_(False).eval()
        force_zeros = bool(model_index(base).get("force_zeros_for_empty_prompt", True))
        return Components(unet, vae, text_encoder, tokenizer, scheduler, clip, face, text_encoder_2, tokenizer_2,
                          force_zeros_for_empty_prompt=force_zeros)


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


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77,
                         pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write vocab.json + merges.txt of the OpenAI CLIP BPE (49408 tokens, as SD1.5's tokenizer)
    from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`, and load it as a CLIPTokenizer.
    `pad_token`: SD1.5's and SDXL's first tokenizer pad with "<|endoftext|>", SDXL's tokenizer_2 with "!"."""
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
        str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length, pad_token=pad_token
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
