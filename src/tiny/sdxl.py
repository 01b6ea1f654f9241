"""The tiny SDXL world: an SDXL-shaped base model written in diffusers' directory format, on the CPU.

`build_sdxl(out, sd15_world)` (command: `python -m src.cli.tiny_sdxl --out artifacts/tiny-sdxl`) writes
  base/            a diffusers StableDiffusionXLPipeline directory (model_index.json): a tiny "text_time" UNet
                   (`architectures.tiny_sdxl_unet`, random weights), two tiny text encoders (CLIPTextModel,
                   CLIPTextModelWithProjection) with their tokenizers (SD1.5's BPE written offline; the second
                   pads with "!", as SDXL's), the SD1.5 world's pretrained tiny VAE and its DDPM scheduler
  clip.safetensors, face_backbone.safetensors   the SD1.5 world's identity encoders, copied
so `tiny_components(out)` (`src.tiny.architectures`) loads it with the same code as real SDXL weights
(`ComponentPaths` detects SDXL from text_encoder_2/ and tokenizer_2/). Training data is the SD1.5 world's
(`artifacts/tiny/data`, see configs/tiny/sdxl/). Deterministic from `seed`; skipped when base/unet exists.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import diffusers
import torch

from src.models import presets
from src.tiny.architectures import tiny_sdxl_text_encoders, tiny_sdxl_unet

log = logging.getLogger(__name__)

SD15_WORLD = Path("artifacts/tiny")
COPIED = ("clip.safetensors", "face_backbone.safetensors")
MODEL_INDEX = {
    "_class_name": presets.SDXL_PIPELINE,
    "force_zeros_for_empty_prompt": True,  # SDXL's unconditional branch: zero text states and pooled embedding
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def build_sdxl(out: Path, sd15_world: Path = SD15_WORLD, seed: int = 0) -> Path:
    """Write the tiny SDXL world under `out` from a built SD1.5 tiny world (`python -m src.tiny`), whose VAE,
    scheduler, CLIP tower and face backbone it reuses; returns `out`. Skipped when out/base/unet exists."""
    out, sd15_world = Path(out), Path(sd15_world)
    for need in (sd15_world / "base" / "vae", sd15_world / "base" / "scheduler", *(sd15_world / f for f in COPIED)):
        if not need.exists():
            raise FileNotFoundError(f"tiny SDXL world: '{need}' not found; build the SD1.5 tiny world first "
                                    f"(python -m src.tiny --out {sd15_world})")
    base = out / "base"
    for name in COPIED:
        if not (out / name).exists():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sd15_world / name, out / name)
    if (base / "unet").exists():
        return out
    for sub in ("vae", "scheduler"):
        shutil.copytree(sd15_world / "base" / sub, base / sub, dirs_exist_ok=True)
    presets.write_clip_tokenizer(base / "tokenizer")
    presets.write_clip_tokenizer(base / "tokenizer_2", pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder, text_encoder_2 = tiny_sdxl_text_encoders()
        unet = tiny_sdxl_unet()
    text_encoder.save_pretrained(base / "text_encoder")
    text_encoder_2.save_pretrained(base / "text_encoder_2")
    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (base / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    unet.save_pretrained(base / "unet")  # last: its presence marks the base model complete
    log.info("tiny SDXL world written to %s (reusing %s)", out, sd15_world)
    return out
