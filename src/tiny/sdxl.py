"""The tiny SDXL world: an SDXL-shaped base model written in diffusers' directory format, on the CPU.

`build_sdxl(out, sd15_world)` (command: `python -m src.cli.tiny_sdxl --out artifacts/tiny-sdxl`) writes
  base/            a diffusers StableDiffusionXLPipeline directory (model_index.json): a tiny "text_time" UNet
                   (`architectures.tiny_sdxl_unet`), two tiny text encoders (CLIPTextModel,
                   CLIPTextModelWithProjection; random, from the seed) with their tokenizers (SD1.5's BPE written
                   offline; the second pads with "!", as SDXL's), the SD1.5 world's pretrained tiny VAE and its
                   DDPM scheduler (SDXL's training schedule is SD1.5's)
  clip.safetensors, face_backbone.safetensors   the SD1.5 world's identity encoders, copied
  tiny_report.json where the UNet came from, its pretraining loss and time
so `tiny_components(out)` (`src.tiny.architectures`) loads it with the same code as real SDXL weights
(`ComponentPaths` detects SDXL from text_encoder_2/ and tokenizer_2/). Training data is the SD1.5 world's
(`artifacts/tiny/data`, see configs/tiny/sdxl/).

Like SDXL itself, the UNet is pretrained before UniPortrait training freezes it: text-conditional denoising
of the SD1.5 world's training renders (`src.tiny.pretrain.pretrain_unet`, with the pooled embedding and
uncropped time_ids as added conditions), ~7 min on 2 cores. Its pretrained weights ship in assets/tiny-sdxl
(manifest.json: the options, including the SD1.5 world's data options and its VAE's sha256, and how they
were made); a build whose options are the manifest's copies them, any other pretrains here and logs why.
`make tiny-sdxl-assets` remakes them. Deterministic from `seed`; skipped when base/unet exists.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler

from src.models import presets
from src.tiny.architectures import tiny_sdxl_text_encoders, tiny_sdxl_unet
from src.tiny.assets import (
    ASSETS,
    DISPLAY_ONLY,
    copy_shipped,
    sha256,
    shipped_weights,
    warn_if_companions_differ,
    write_report,
)
from src.tiny.pretrain import load_images, pretrain_unet

log = logging.getLogger(__name__)

SD15_WORLD = Path("artifacts/tiny")
COPIED = ("clip.safetensors", "face_backbone.safetensors")
# The tiny SDXL UNet's pretrained weights, shipped (`make tiny-sdxl-assets`), and the random text encoders it
# was pretrained against (their sha256 is recorded: a machine drawing other random floats says so).
SDXL_ASSETS = ASSETS.parent / "tiny-sdxl"
SDXL_PRETRAINED_FILES = ("base/unet/config.json", "base/unet/diffusion_pytorch_model.safetensors")
SDXL_COMPANIONS = ("base/text_encoder/model.safetensors", "base/text_encoder_2/model.safetensors")
VAE_FILE = "base/vae/diffusion_pytorch_model.safetensors"
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


def sdxl_options(sd15_data_options: dict, vae_sha256: str, seed: int, unet_steps: int,
                 pretrain_images: int) -> dict:
    """Everything the pretrained tiny SDXL UNet depends on besides the code: the SD1.5 world's data options
    (its renders are the pretraining images) and VAE (the latents), the seed and the pretraining length."""
    data = {k: v for k, v in sd15_data_options.items() if k not in DISPLAY_ONLY}
    return {"seed": seed, "data": data, "vae": vae_sha256, "unet_steps": unet_steps,
            "pretrain_images": pretrain_images}


def build_sdxl(out: Path, sd15_world: Path = SD15_WORLD, seed: int = 0, unet_steps: int = 400,
               pretrain_images: int = 2000, pretrain: bool = False, assets: Path | None = SDXL_ASSETS) -> Path:
    """Write the tiny SDXL world under `out` from a built SD1.5 tiny world (`python -m src.tiny`), whose data,
    VAE, scheduler, CLIP tower and face backbone it reuses; returns `out`. The UNet is copied from `assets`
    when its manifest was made with this call's options, else (or with `pretrain`) pretrained here for
    `unet_steps` steps on the first `pretrain_images` single-face training renders. Skipped when
    out/base/unet exists."""
    out, sd15_world = Path(out), Path(sd15_world)
    data_manifest = sd15_world / "data" / "manifest.json"
    for need in (sd15_world / VAE_FILE, sd15_world / "base" / "scheduler", data_manifest,
                 *(sd15_world / f for f in COPIED)):
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
    t0 = time.time()
    for sub in ("vae", "scheduler"):
        shutil.copytree(sd15_world / "base" / sub, base / sub, dirs_exist_ok=True)
    tokenizers = (presets.write_clip_tokenizer(base / "tokenizer"),
                  presets.write_clip_tokenizer(base / "tokenizer_2", pad_token="!"))
    data = json.loads(data_manifest.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoders = tiny_sdxl_text_encoders()
        unet = tiny_sdxl_unet(sample_size=data["options"]["size"] // 4)  # the VAE's factor 4
    for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
        encoder.eval().requires_grad_(False).save_pretrained(base / name)
    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (base / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    options = sdxl_options(data["options"], sha256(sd15_world / VAE_FILE), seed, unet_steps, pretrain_images)
    shipped = None if pretrain else shipped_weights(assets, options, SDXL_PRETRAINED_FILES)
    report: dict = {"seed": seed}
    if shipped:
        warn_if_companions_differ(shipped, out, "make tiny-sdxl PRETRAIN=1")
        report["pretrained"] = {"source": str(assets), "made": shipped["made"]}
        report["unet_loss"] = shipped["report"]["unet_loss"]
        copy_shipped(assets, out, SDXL_PRETRAINED_FILES)  # base/unet last: the base model is complete
    else:
        images, captions = load_images(data["splits"]["single_train"]["path_pattern"], pretrain_images)
        vae = AutoencoderKL.from_pretrained(base / "vae").eval().requires_grad_(False)
        scheduler = DDPMScheduler.from_pretrained(base / "scheduler")
        report["pretrained"] = {"source": "pretrained here", "options": options}
        report["unet_loss"] = pretrain_unet(unet, vae, tokenizers, text_encoders, scheduler, images, captions,
                                            unet_steps, seed=seed)
        unet.save_pretrained(base / "unet")  # last: its presence marks the base model complete
    report["pretrained"]["seconds"] = round(time.time() - t0, 1)
    write_report(out, report)
    log.info("tiny SDXL world written to %s (reusing %s; UNet %s)", out, sd15_world, report["pretrained"]["source"])
    return out
