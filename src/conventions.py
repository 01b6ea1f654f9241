"""Tensor conventions, defined once and imported everywhere else.

- Images:          float32 (B, 3, H, W), RGB, range [-1, 1].
- Face masks:      float32 (B, N, H, W) in {0, 1}, at image resolution, one per identity slot.
- Face validity:   bool (B, N); padded identity slots are False and are never routed to.
- Recognition crop: (B, N, 3, 112, 112) in [-1, 1], similarity-aligned to ARCFACE_TEMPLATE_112.
- CLIP crop:       (B, N, 3, S, S) in [-1, 1]; `to_clip_pixels` normalises for the CLIP tower.
- Identity labels: long (B, N), -1 when unknown.
- Identity colours: slot n is IDENTITY_COLOURS[n % 16] in every picture (TensorBoard routing panels,
  routing_maps.png, generate's routing-map PNGs, the web demo, the evaluation sheets).
"""
from __future__ import annotations

import numpy as np
import torch

FACE_RECOG_SIZE = 112
CLIP_CROP_SIZE = 224  # SD1.5 scale; the tiny preset resizes to its own tower's image size

# Standard ArcFace 5-point template (left eye, right eye, nose, left mouth, right mouth) for 112x112.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# 16 distinguishable identity colours (RGB uint8), in slot order.
IDENTITY_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
)

# OpenAI / OpenCLIP image normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_clip_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] images (..., 3, H, W) -> CLIP-normalised pixels (..., 3, size, size), bilinear resize."""
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    x = ((x + 1) / 2 - mean) / std
    return x.reshape(*lead, *x.shape[-3:])


def to_recog_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] face crops (..., 3, H, W) -> (..., 3, 112, 112) for the recognition backbone."""
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    if x.shape[-1] != FACE_RECOG_SIZE or x.shape[-2] != FACE_RECOG_SIZE:
        x = torch.nn.functional.interpolate(
            x, size=(FACE_RECOG_SIZE, FACE_RECOG_SIZE), mode="bilinear", align_corners=False
        )
    return x.reshape(*lead, *x.shape[-3:])


def uint8_to_unit(x: np.ndarray) -> torch.Tensor:
    """HWC (or NHWC) uint8 array -> CHW (or NCHW) float tensor in [-1, 1]."""
    t = torch.from_numpy(np.array(x, dtype=np.float32)).div_(127.5).sub_(1.0)  # copy: PIL arrays are read-only
    return t.movedim(-1, -3)


def vae_latents(vae: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the latents the UNet sees: posterior mode (deterministic) times the
    VAE's scaling factor, (B, C, H/f, W/f). Training and the latent cache both use this.

    A VAE whose config sets `force_upcast` (SDXL's overflows in float16) encodes outside a float16 autocast
    (Lightning's `16-mixed`), in its own dtype: `src.precision.cast_frozen` keeps such a VAE in fp32."""
    device = image.device.type
    if getattr(vae.config, "force_upcast", False) and torch.is_autocast_enabled(device) \
            and torch.get_autocast_dtype(device) == torch.float16:
        with torch.autocast(device, enabled=False):
            return vae.encode(image.to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    return vae.encode(image).latent_dist.mode() * vae.config.scaling_factor


def checked_cached_latents(vae: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A batch's cached `latents` (B, C, H/f, W/f) (`data.cached_latents`), after checking they are what
    `vae_latents` would give for its `image` now: the same scaling factor and latent shape."""
    latents, scaling = batch["latents"], batch["latent_scaling"].double().cpu()
    expected = float(vae.config.scaling_factor)
    if not torch.allclose(scaling, torch.full_like(scaling, expected)):
        raise ValueError(f"cached latents were made with VAE scaling factor(s) {sorted(set(scaling.tolist()))}, "
                         f"this model's VAE has {expected}: recache with this VAE (datamodules.latent_cache)")
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    want = (vae.config.latent_channels, batch["image"].shape[-2] // f, batch["image"].shape[-1] // f)
    if tuple(latents.shape[1:]) != want:
        raise ValueError(f"cached latents are {tuple(latents.shape[1:])} per image, this VAE makes {want} at "
                         f"{tuple(batch['image'].shape[-2:])} px: recache with this VAE and resolution")
    return latents
