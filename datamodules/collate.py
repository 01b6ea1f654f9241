"""The batch collate of the face shard loader: per-sample items (`datamodules.loader`) -> one batch.

Batch contract of :func:`collate_faces` (B samples, Nmax = most faces in the batch, at least 1; (H, W) is the
training frame: (R, R), or one aspect-ratio bucket per batch with `datamodules.buckets`)::

    image       float (B, 3, H, W) in [-1, 1]
    caption     list[str]
    face_recog  float (B, Nmax, 3, 112, 112) in [-1, 1]   (zeros in padded slots)
    face_clip   float (B, Nmax, 3, S, S) in [-1, 1]
    face_masks  float (B, Nmax, H, W) in {0, 1}
    face_valid  bool  (B, Nmax)
    face_digest long  (B, Nmax)  fingerprint of each face's recognition + CLIP crop bytes (0 in padded slots):
                                 equal crops, equal digest (the key of the module's frozen-feature cache)
    identity    list[list[str | None]]  (B lists of Nmax; None when unknown or padded)
    reference_key list[list[str | None]]  key of the image each recognition crop came from
    key         list[str]
    num_faces   long  (B,)
    skipped     long  (B,)
    original_size long (B, 2)  (height, width) of each source image, before any crop or resize
    crop_top_left long (B, 2)  (top, left) of the crop in the source image scaled to the training frame: the
                               crop (x0, y0, cw, ch) resized to the frame (H, W) gives
                               (round(y0 * H / ch), round(x0 * W / cw)) (diffusers' SDXL convention, crop
                               after resize); negative when the crop starts beyond the image (zero padding).
                               With the frame (H, W) as target size these are SDXL's added time ids;
                               SD1.5 ignores them
    latents     float (B, C, H/f, W/f)  only with cached latents (StreamConfig.cached_latents): scaled VAE latents
    latent_scaling float64 (B,)       the VAE scaling factor each cached latent was made with
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from src.conventions import FACE_RECOG_SIZE, uint8_to_unit


def _resize_crops(crops: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, s, s, 3) -> (n, size, size, 3), bilinear (only when a shard's crop size differs)."""
    if crops.shape[1] == size:
        return crops
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.Resampling.BILINEAR)) for c in crops])


def face_digest(recog: np.ndarray, clip: np.ndarray) -> int:
    """Non-zero signed 64-bit fingerprint of one face's uint8 recognition and CLIP crops (BLAKE2b of their
    shapes and bytes): the same crops always give the same value, different crops collide with chance 2^-64."""
    h = hashlib.blake2b(digest_size=8)
    for a in (recog, clip):
        a = np.ascontiguousarray(a)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest(), "little", signed=True) or 1


def collate_faces(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch per-sample items into the batch contract (module docstring); faces padded to the batch maximum."""
    b = len(items)
    n_max = max(1, max(len(it["identity"]) for it in items))
    h, w = items[0]["image"].shape[:2]
    sizes = {tuple(it["image"].shape[:2]) for it in items}
    if len(sizes) > 1:
        raise ValueError(f"collate_faces: a batch mixes frame sizes {sorted(sizes)} (keys "
                         f"{[it['key'] for it in items]}); bucketed samples must be batched per bucket "
                         "(datamodules.buckets.batch_by_bucket)")
    clip_size = next((it["clip"].shape[1] for it in items if len(it["clip"])), FACE_RECOG_SIZE)
    image = uint8_to_unit(np.stack([it["image"] for it in items]))  # (B, 3, H, W)
    recog = torch.zeros(b, n_max, 3, FACE_RECOG_SIZE, FACE_RECOG_SIZE)  # (B, Nmax, 3, 112, 112)
    clip = torch.zeros(b, n_max, 3, clip_size, clip_size)  # (B, Nmax, 3, S, S)
    masks = torch.zeros(b, n_max, h, w)  # (B, Nmax, H, W)
    valid = torch.zeros(b, n_max, dtype=torch.bool)
    digest = torch.zeros(b, n_max, dtype=torch.long)
    identity: list[list[str | None]] = []
    reference: list[list[str | None]] = []
    for i, it in enumerate(items):
        n = len(it["identity"])
        if n:
            clip_crops = _resize_crops(it["clip"], clip_size)  # uint8 (n, S, S, 3)
            recog[i, :n] = uint8_to_unit(it["recog"])
            clip[i, :n] = uint8_to_unit(clip_crops)
            masks[i, :n] = torch.from_numpy(it["masks"].astype(np.float32))
            valid[i, :n] = True
            digest[i, :n] = torch.tensor([face_digest(r, c) for r, c in zip(it["recog"], clip_crops)])
        identity.append(list(it["identity"]) + [None] * (n_max - n))
        reference.append(list(it["reference_key"]) + [None] * (n_max - n))
    return {
        "image": image,
        "caption": [it["caption"] for it in items],
        "face_recog": recog,
        "face_clip": clip,
        "face_masks": masks,
        "face_valid": valid,
        "face_digest": digest,
        "identity": identity,
        "reference_key": reference,
        "key": [it["key"] for it in items],
        "num_faces": torch.tensor([len(it["identity"]) for it in items], dtype=torch.long),
        "skipped": torch.tensor([it["skipped"] for it in items], dtype=torch.long),
        "original_size": torch.tensor([it["original_size"] for it in items], dtype=torch.long).view(b, 2),
        "crop_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.long).view(b, 2),
    } | _collate_latents(items)


def _collate_latents(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """{"latents": (B, C, h, w) float32, "latent_scaling": (B,) float64} when every item has a cached latent."""
    if not all("latents" in it for it in items):
        return {}
    return {
        "latents": torch.from_numpy(np.stack([it["latents"] for it in items]).astype(np.float32)),
        "latent_scaling": torch.tensor([it["latent_scaling"] for it in items], dtype=torch.float64),
    }
