"""Square crops that keep every face in frame, resized to the training resolution.

Both transforms take a schema `Sample` and return a new one whose image is (R, R, 3), whose face boxes and
landmarks are mapped into the new frame and whose masks are cropped and resized (nearest) with the image; the
aligned recognition/CLIP crops are untouched (they were cut from the original image).

- `random_face_crop`: training. A random square whose side is drawn between `min_scale` x the short side (or the
  faces' union, whichever is larger) and the short side, placed at random among the positions that contain the
  union of all face boxes.
- `eval_face_crop`: evaluation. Deterministic: the largest square of the image, centred, shifted just enough to
  contain all faces (for a square image this is a plain resize).

When the faces' union is larger than the short side (wide group photos) the square extends beyond the image and
the outside is zero-padded, so faces are never cut. Coordinates are continuous pixels (pixel i spans [i, i+1)).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image

from datamodules.schema import Face, Sample


def union_box(faces: list[Face]) -> np.ndarray | None:
    """[x0, y0, x1, y1] covering every face box, or None without faces."""
    if not faces:
        return None
    b = np.asarray([f.box for f in faces], np.float64)  # (N, 4)
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def _axis_range(lo_face: int, hi_face: int, side: int, length: int) -> tuple[int, int]:
    """Valid integer starts along one axis: the window [s, s+side) holds [lo_face, hi_face) and, if it fits,
    stays inside [0, length). Returns (lo, hi) inclusive; lo > hi never happens (falls back to centring)."""
    lo = max(hi_face - side, 0)
    hi = min(lo_face, length - side)
    if lo <= hi:
        return lo, hi
    start = (lo_face + hi_face - side) // 2  # does not fit inside the image: centre on the faces (zero-padded)
    start = min(max(start, hi_face - side), lo_face)
    return start, start


def _face_extent(sample: Sample) -> tuple[int, int, int, int] | None:
    u = union_box(sample.faces)
    if u is None:
        return None
    h, w = sample.image.shape[:2]
    x0, y0 = max(0, math.floor(u[0])), max(0, math.floor(u[1]))
    x1, y1 = min(w, math.ceil(u[2])), min(h, math.ceil(u[3]))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def random_square(
    sample: Sample, rng: np.random.Generator, min_scale: float = 0.6
) -> tuple[int, int, int]:
    """Random (x0, y0, side) of a square that contains all faces; side in [min_scale * short side, short side]."""
    h, w = sample.image.shape[:2]
    short = min(h, w)
    ext = _face_extent(sample)
    need = 1 if ext is None else max(ext[2] - ext[0], ext[3] - ext[1])
    lo_side = max(need, int(math.ceil(min_scale * short)))
    side = lo_side if lo_side >= short else int(rng.integers(lo_side, short + 1))
    if ext is None:
        xr, yr = (0, max(w - side, 0)), (0, max(h - side, 0))
    else:
        xr, yr = _axis_range(ext[0], ext[2], side, w), _axis_range(ext[1], ext[3], side, h)
    return int(rng.integers(xr[0], xr[1] + 1)), int(rng.integers(yr[0], yr[1] + 1)), side


def centre_square(sample: Sample) -> tuple[int, int, int]:
    """Deterministic (x0, y0, side): the largest centred square, shifted minimally to contain all faces."""
    h, w = sample.image.shape[:2]
    ext = _face_extent(sample)
    side = min(h, w)
    if ext is not None:
        side = max(side, ext[2] - ext[0], ext[3] - ext[1])

    def place(length: int, lo_face: int | None, hi_face: int | None) -> int:
        start = (length - side) // 2
        if lo_face is None or hi_face is None:
            return start
        lo, hi = _axis_range(lo_face, hi_face, side, length)
        return min(max(start, lo), hi)

    x0 = place(w, ext[0] if ext else None, ext[2] if ext else None)
    y0 = place(h, ext[1] if ext else None, ext[3] if ext else None)
    return x0, y0, side


def _crop_padded(arr: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    """arr[..., y0:y0+side, x0:x0+side] over the (H, W) axes given as axes 0, 1; outside the image is zero."""
    h, w = arr.shape[:2]
    out = np.zeros((side, side) + arr.shape[2:], arr.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def crop_and_resize(sample: Sample, x0: int, y0: int, side: int, resolution: int) -> Sample:
    """Crop the square [x0, x0+side) x [y0, y0+side) (zero-padded outside) and resize it to `resolution`.

    image uint8 (H, W, 3) -> (R, R, 3) bilinear; masks uint8 (N, H, W) -> (N, R, R) nearest; boxes and landmarks
    follow: p' = (p - (x0, y0)) * R / side.
    """
    k = resolution / side
    img = Image.fromarray(_crop_padded(sample.image, x0, y0, side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BILINEAR)
    masks = np.zeros((len(sample.faces), resolution, resolution), np.uint8)
    for i, m in enumerate(sample.masks):
        mi = Image.fromarray(_crop_padded(m, x0, y0, side))
        masks[i] = np.asarray(mi.resize((resolution, resolution), Image.Resampling.NEAREST)) if side != resolution \
            else np.asarray(mi)
    offset = np.array([x0, y0], np.float64)
    faces = []
    for f in sample.faces:
        box = (np.asarray(f.box, np.float64).reshape(2, 2) - offset) * k
        lms = (np.asarray(f.landmarks, np.float64) - offset) * k
        faces.append(replace(f, box=box.reshape(-1).tolist(), landmarks=lms.tolist()))
    return replace(sample, image=np.asarray(img), faces=faces, masks=masks)


def random_face_crop(sample: Sample, resolution: int, rng: np.random.Generator, min_scale: float = 0.6) -> Sample:
    """Training transform: random square containing all faces, resized to (resolution, resolution)."""
    x0, y0, side = random_square(sample, rng, min_scale)
    return crop_and_resize(sample, x0, y0, side, resolution)


def eval_face_crop(sample: Sample, resolution: int) -> Sample:
    """Evaluation transform: deterministic face-preserving square (plain resize for square images)."""
    x0, y0, side = centre_square(sample)
    return crop_and_resize(sample, x0, y0, side, resolution)
