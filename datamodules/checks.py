"""Checks a decoded sample must pass before the face shard loader uses it (`datamodules.loader` skips, counts
and logs a sample that fails one)."""
from __future__ import annotations

import numpy as np

from datamodules.schema import LATENT_KEY, Sample, SampleError
from src.conventions import FACE_RECOG_SIZE


def check_arrays(sample: Sample, where: str) -> None:
    """Reject arrays a decoded sample must not hold (SampleError naming the shard:key and field).

    masks (N, H, W) uint8/bool in {0, 1}; recog crops (N, 112, 112, 3) uint8; clip crops (N, S, S, 3) uint8.
    Float arrays (e.g. a cache written as float, possibly holding NaN/inf) are refused rather than silently
    rescaled by the uint8 -> [-1, 1] conversion.
    """
    fields = {"masks.npz": sample.masks, "recog.npz": sample.recog, "clip.npz": sample.clip}
    for name, arr in fields.items():
        if arr.dtype == np.uint8 or (name == "masks.npz" and arr.dtype == np.bool_):
            continue
        bad = ""
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = f", {int((~np.isfinite(arr)).sum())} non-finite value(s)"
        raise SampleError(f"{where}: field {name!r} has dtype {arr.dtype}{bad}; expected uint8")
    if sample.masks.size and sample.masks.max() > 1:
        raise SampleError(f"{where}: field 'masks.npz' holds values up to {int(sample.masks.max())}; masks are 0/1")
    if sample.recog.ndim != 4 or sample.recog.shape[1:] != (FACE_RECOG_SIZE, FACE_RECOG_SIZE, 3):
        raise SampleError(f"{where}: field 'recog.npz' crops are {sample.recog.shape}; expected (N, "
                          f"{FACE_RECOG_SIZE}, {FACE_RECOG_SIZE}, 3)")
    if sample.clip.ndim != 4 or sample.clip.shape[3] != 3 or sample.clip.shape[1] != sample.clip.shape[2]:
        raise SampleError(f"{where}: field 'clip.npz' crops are {sample.clip.shape}; expected (N, S, S, 3)")


def latent_problem(sample: Sample, frame: tuple[int, int]) -> str | None:
    """Why a sample's cached latent cannot be used for the training frame (h, w) the loader gives it: (R, R),
    or its bucket (None when it can)."""
    cached = sample.extra.get("latent")
    if cached is None:
        return f"no cached latent (field '{LATENT_KEY}'; write it with python -m datamodules.latent_cache)"
    if tuple(cached.frame) != tuple(frame):
        (ch, cw), (h, w) = cached.frame, frame
        return (f"cached latent is of a {ch}x{cw} frame, data.resolution / data.buckets give this image {h}x{w} "
                "(re-run python -m datamodules.latent_cache with the training resolution or buckets)")
    return None
