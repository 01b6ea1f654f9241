"""The one WebDataset shard schema, written by `datamodules.synthetic` and `datamodules.prepare`
and read by the DataModules.

One sample = files sharing a ``__key__`` inside a tar shard:

| extension     | content                                                                        |
|---------------|--------------------------------------------------------------------------------|
| ``jpg``       | the full image, RGB (JPEG; ``png`` is accepted too)                              |
| ``txt``       | the caption (UTF-8)                                                            |
| ``faces.json``| ``{"faces": [{"box": [x0,y0,x1,y1], "landmarks": [[x,y]*5], "prob": p,          |
|               |   "identity": str | null}, ...], "width": W, "height": H, "source": str}``      |
|               | boxes and landmarks in pixels of ``jpg``; landmarks: left eye, right eye,       |
|               | nose, left mouth corner, right mouth corner (image left/right)                 |
| ``masks.npz`` | ``masks``: uint8 (N, H, W) in {0, 1}, one binary mask per face, same order      |
| ``recog.npz`` | ``crops``: uint8 (N, 112, 112, 3), each face aligned to ARCFACE_TEMPLATE_112     |
| ``clip.npz``  | ``crops``: uint8 (N, S, S, 3), the matching larger aligned crop for CLIP         |

| ``latent.npz``| optional (``datamodules.latent_cache``): ``latent`` float16 (C, h/f, w/f), the |
|               | scaled VAE latent of the crop window ``box`` (x0, y0, width, height) resized to  |
|               | ``frame`` (h, w): (R, R), or a bucket; ``scaling_factor`` of the VAE;           |
|               | ``original_size`` (H, W) and ``crop_top_left`` (top, left), SDXL's size         |
|               | conditioning of that crop; decoded into ``Sample.extra["latent"]``. Older       |
|               | (square-only) caches hold ``box`` (x0, y0, side) and ``resolution`` R instead,  |
|               | read as the window (x0, y0, side, side) and the frame (R, R); the oldest lack   |
|               | the size conditioning                                                          |

Readers ignore unknown extensions.
Every face in ``faces.json`` has one mask and one crop of each kind, in the same order.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png")
REQUIRED_KEYS = ("txt", "faces.json", "masks.npz", "recog.npz", "clip.npz")
SCHEMA_VERSION = 1


class SampleError(ValueError):
    """A sample that cannot be used; the message names the shard, key and field at fault."""


@dataclass
class Face:
    box: list[float]
    landmarks: list[list[float]]
    prob: float = 1.0
    identity: str | None = None


@dataclass
class Sample:
    key: str
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    faces: list[Face]
    masks: np.ndarray  # uint8 (N, H, W)
    recog: np.ndarray  # uint8 (N, 112, 112, 3)
    clip: np.ndarray  # uint8 (N, S, S, 3)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _npz_load(data: bytes, name: str) -> np.ndarray:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return f[name]


LATENT_KEY = "latent.npz"


@dataclass(frozen=True)
class CachedLatent:
    latent: np.ndarray  # float16 (C, h/f, w/f), already multiplied by the VAE's scaling factor
    box: tuple[int, int, int, int]  # the crop window (x0, y0, width, height) in pixels of the full image
    frame: tuple[int, int]  # (h, w) the window was resized to before encoding: (R, R) or a bucket
    scaling_factor: float
    original_size: tuple[int, int] | None = None  # (H, W) of the full image; None: a cache without it
    crop_top_left: tuple[int, int] | None = None  # (top, left) of the crop scaled to the frame (datamodules.collate)


def encode_latent(c: CachedLatent) -> bytes:
    sizes = {} if c.original_size is None or c.crop_top_left is None else {
        "original_size": np.asarray(c.original_size, np.int64), "crop_top_left": np.asarray(c.crop_top_left, np.int64)}
    return _npz_bytes(latent=c.latent.astype(np.float16), box=np.asarray(c.box, np.int64),
                      frame=np.asarray(c.frame, np.int64), scaling_factor=np.float64(c.scaling_factor), **sizes)


def _pair(f: Any, name: str, where: str) -> tuple[int, int] | None:
    """An optional int64 (2,) array of a latent.npz as a pair (None when absent)."""
    if name not in f.files:
        return None
    v = f[name]
    if v.shape != (2,):
        raise SampleError(f"{where}: field '{LATENT_KEY}' has {name} of shape {v.shape}; expected (2,)")
    return int(v[0]), int(v[1])


def _window_and_frame(f: Any, where: str) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """A latent.npz's crop window (x0, y0, width, height) and frame (h, w); an older (square-only) cache
    holds a square box (x0, y0, side) and its resolution R instead."""
    box = f["box"]
    if box.shape == (3,) and "resolution" in f.files:  # the square cache
        r = int(f["resolution"])
        return (int(box[0]), int(box[1]), int(box[2]), int(box[2])), (r, r)
    frame = _pair(f, "frame", where)
    if box.shape != (4,) or frame is None:
        raise SampleError(f"{where}: field '{LATENT_KEY}' has a box of shape {box.shape} and "
                          f"{'a' if frame else 'no'} frame; expected a box (4,) and a frame (2,)")
    return (int(box[0]), int(box[1]), int(box[2]), int(box[3])), frame


def decode_latent(data: bytes, where: str) -> CachedLatent:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            latent, scale = f["latent"], float(f["scaling_factor"])
            box, frame = _window_and_frame(f, where)
            sizes = _pair(f, "original_size", where), _pair(f, "crop_top_left", where)
    except SampleError:
        raise
    except Exception as e:
        raise SampleError(f"{where}: field '{LATENT_KEY}' is unreadable ({e})") from e
    if latent.ndim != 3 or not np.isfinite(latent).all():
        raise SampleError(f"{where}: field '{LATENT_KEY}' holds a latent of shape {latent.shape}; expected "
                          "(C, h, w), finite")
    return CachedLatent(latent, box, frame, scale, *sizes)


def encode_sample(s: Sample, jpeg_quality: int = 95) -> dict[str, Any]:
    """Sample -> dict of bytes for `webdataset.TarWriter`."""
    n = len(s.faces)
    if not (s.masks.shape[0] == s.recog.shape[0] == s.clip.shape[0] == n):
        raise SampleError(
            f"{s.key}: {n} faces but {s.masks.shape[0]} masks, {s.recog.shape[0]} recog crops, "
            f"{s.clip.shape[0]} clip crops"
        )
    buf = io.BytesIO()
    Image.fromarray(s.image).save(buf, format="JPEG", quality=jpeg_quality)
    h, w = s.image.shape[:2]
    meta = {
        "faces": [f.__dict__ for f in s.faces],
        "width": w,
        "height": h,
        "source": s.source,
        "schema": SCHEMA_VERSION,
    }
    return {
        "__key__": s.key,
        "jpg": buf.getvalue(),
        "txt": s.caption.encode("utf-8"),
        "faces.json": json.dumps(meta).encode("utf-8"),
        "masks.npz": _npz_bytes(masks=s.masks.astype(np.uint8)),
        "recog.npz": _npz_bytes(crops=s.recog.astype(np.uint8)),
        "clip.npz": _npz_bytes(crops=s.clip.astype(np.uint8)),
    }


def decode_sample(raw: dict[str, Any]) -> Sample:
    """Dict of raw bytes (as webdataset yields it) -> Sample. Raises SampleError naming the fault."""
    key = raw.get("__key__", "?")
    where = f"{raw.get('__url__', '?')}:{key}"
    img_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if img_key is None:
        raise SampleError(f"{where}: no image field (expected one of {IMAGE_KEYS})")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise SampleError(f"{where}: missing field(s) {missing}")
    try:
        image = np.asarray(Image.open(io.BytesIO(raw[img_key])).convert("RGB"))
    except Exception as e:  # truncated JPEG, non-image bytes, ...
        raise SampleError(f"{where}: field '{img_key}' is not a readable image ({e})") from e
    try:
        caption = raw["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleError(f"{where}: field 'txt' is not UTF-8") from e
    try:
        meta = json.loads(raw["faces.json"])
        faces = [Face(**f) for f in meta["faces"]]
    except Exception as e:
        raise SampleError(f"{where}: field 'faces.json' is malformed ({e})") from e
    try:
        masks = _npz_load(raw["masks.npz"], "masks")
        recog = _npz_load(raw["recog.npz"], "crops")
        clip = _npz_load(raw["clip.npz"], "crops")
    except Exception as e:
        raise SampleError(f"{where}: an .npz field is unreadable ({e})") from e
    n = len(faces)
    if not (masks.shape[0] == recog.shape[0] == clip.shape[0] == n):
        raise SampleError(
            f"{where}: {n} faces but {masks.shape[0]} masks, {recog.shape[0]} recog crops, {clip.shape[0]} clip crops"
        )
    if n and masks.shape[1:] != image.shape[:2]:
        raise SampleError(f"{where}: masks are {masks.shape[1:]} but the image is {image.shape[:2]}")
    extra = {"latent": decode_latent(raw[LATENT_KEY], where)} if LATENT_KEY in raw else {}
    return Sample(
        key=key, image=image, caption=caption, faces=faces, masks=masks, recog=recog, clip=clip,
        source=meta.get("source", ""), extra=extra,
    )
