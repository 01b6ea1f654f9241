"""Aspect-ratio buckets: each sample is cropped to the bucket closest to its aspect ratio, and batches hold
samples of one bucket only (SDXL is trained at ~1024^2 pixels in buckets of several aspect ratios).

A bucket is a frame (h, w) in pixels. `data.buckets` takes a preset name or an explicit list of [h, w]::

    data:
      buckets: sdxl_1024          # or [[1024, 1024], [896, 1152], ...]; null: square crops at data.resolution

Presets (`BUCKET_PRESETS`; the frames SDXL was trained on, about 1024^2 pixels each, sides multiples of 64):

| name        | buckets (h, w)                                                                        |
|-------------|---------------------------------------------------------------------------------------|
| ``sdxl_1024`` | 1024x1024, 896x1152, 1152x896, 832x1216, 1216x832, 768x1344, 1344x768, 640x1536, 1536x640 |

Sides should be multiples of the VAE's downsampling times the UNet's (8 x 8 = 64 on SDXL), so every latent
of a bucket has the same shape.

Assignment (`nearest_bucket`): the bucket whose log aspect ratio log(w / h) is closest to the source image's
(ties: the earlier bucket in the list); the crop is then a face-preserving window of that aspect
(`datamodules.transforms`). Batching (`batch_by_bucket`): one buffer per bucket; a buffer that reaches the
batch size is yielded as one batch, and at the end of the stream the partial buffers are yielded in bucket
order, so every sample of an epoch is in exactly one batch.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

Bucket = tuple[int, int]  # (height, width) in pixels

BUCKET_PRESETS: dict[str, tuple[Bucket, ...]] = {
    "sdxl_1024": (
        (1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768),
        (640, 1536), (1536, 640),
    ),
}


def resolve_buckets(spec: str | Sequence[Sequence[int]] | None) -> tuple[Bucket, ...] | None:
    """`data.buckets` -> a tuple of (h, w), or None (square crops). Raises ValueError naming the bad value."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in BUCKET_PRESETS:
            raise ValueError(f"data.buckets={spec!r} is not a bucket preset; known: {sorted(BUCKET_PRESETS)} "
                             "(or give a list of [h, w])")
        return BUCKET_PRESETS[spec]
    buckets: list[Bucket] = []
    for b in spec:
        if len(b) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in b):
            raise ValueError(f"data.buckets: {list(b)!r} is not a bucket [h, w] of two positive integers")
        if b[0] % 8 or b[1] % 8:
            raise ValueError(f"data.buckets: {list(b)!r} has a side that is not a multiple of 8 (the VAE's "
                             "downsampling; the SD1.5 and SDXL UNets need multiples of 64)")
        buckets.append((int(b[0]), int(b[1])))
    if not buckets:
        raise ValueError("data.buckets is an empty list; give at least one [h, w] (or null for square crops)")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"data.buckets lists a bucket twice: {buckets}")
    return tuple(buckets)


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to height x width's (in log ratio; ties: the first listed)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - target))


def training_frame(height: int, width: int, resolution: int | None, buckets: Sequence[Bucket] | None) -> Bucket:
    """The frame (h, w) an image of height x width is cropped to: the bucket nearest its aspect ratio, else
    (resolution, resolution). Shared by the loader and the latent cache, so a cached latent is of the frame the
    loader gives its image."""
    if buckets:
        return nearest_bucket(height, width, buckets)
    if resolution is None:
        raise ValueError("training_frame: give a resolution or buckets")
    return resolution, resolution


def batch_by_bucket(items: Iterable[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Group per-sample items (whose ``image`` is (h, w, 3)) into batches of one frame size each.

    A bucket's buffer is yielded when it holds `batch_size` items; at the end the partial buffers are yielded
    in the order their buckets first appeared. Deterministic for a given item stream (resume replays it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_by_bucket: batch_size={batch_size} must be >= 1")
    buffers: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for item in items:
        buf = buffers.setdefault(tuple(item["image"].shape[:2]), [])
        buf.append(item)
        if len(buf) == batch_size:
            yield list(buf)
            buf.clear()
    for buf in buffers.values():
        if buf:
            yield buf
