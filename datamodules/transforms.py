"""Face-preserving crops, resized to the training frame: a square (R, R) or an aspect-ratio bucket (h, w).

Both transforms take a schema `Sample` and return a new one whose image is (H', W', 3), whose face boxes and
landmarks are mapped into the new frame and whose masks are cropped and resized (nearest) with the image; the
aligned recognition/CLIP crops are untouched (they were cut from the original image). `size` is either an int R
(a square window resized to (R, R): the default training frame) or a bucket (h, w) (a window of aspect w / h,
see `datamodules.buckets`); a square is the bucket (R, R) and gives the same windows.

- `random_face_crop`: training. A random window of the frame's aspect whose width is drawn between `min_scale` x
  the widest window that fits in the image (or the faces' union, whichever is larger) and that widest window,
  placed at random among the positions that contain the union of all face boxes.
- `eval_face_crop`: evaluation. Deterministic: the largest window of the image, centred, shifted just enough to
  contain all faces (for an image of the frame's aspect this is a plain resize).

When the faces' union does not fit in such a window inside the image (wide group photos) the window extends
beyond the image and the outside is zero-padded, so faces are never cut. Coordinates are continuous pixels
(pixel i spans [i, i+1)).

The output's ``extra`` records the crop for SDXL's size conditioning (the batch contract in
`datamodules.collate`): ``original_size`` = (H, W) of the source image and ``crop_top_left`` = (top, left) of
the window in the source scaled to the output frame, (round(y0 * h / ch), round(x0 * w / cw)) for a window
(x0, y0, cw, ch) resized to (h, w): negative when the window starts beyond the image (zero padding).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from PIL import Image

from datamodules.schema import Face, Sample

Window = tuple[int, int, int, int]  # (x0, y0, width, height) in pixels of the source image


def union_box(faces: list[Face]) -> np.ndarray | None:
    """[x0, y0, x1, y1] covering every face box, or None without faces."""
    if not faces:
        return None
    b = np.asarray([f.box for f in faces], np.float64)  # (N, 4)
    return np.array([b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()])


def frame_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """The output frame (h, w) of `size`: an int R is the square (R, R)."""
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


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


def _window_widths(sample: Sample, aspect: tuple[int, int]) -> tuple[int, int]:
    """(widest window width that fits in the image, narrowest width that holds every face) for windows of
    aspect (h, w); a window of width cw is round(cw * h / w) high."""
    ah, aw = aspect
    h, w = sample.image.shape[:2]
    fit = max(1, min(w, h * aw // ah))  # round(fit * ah / aw) <= h
    ext = _face_extent(sample)
    need = 1 if ext is None else max(ext[2] - ext[0], -(-(ext[3] - ext[1]) * aw // ah))
    return fit, need


def _place(sample: Sample, cw: int, ch: int, pick) -> tuple[int, int]:
    """(x0, y0) of a cw x ch window holding every face: `pick(axis, lo, hi)` chooses in the valid range."""
    h, w = sample.image.shape[:2]
    ext = _face_extent(sample)
    if ext is None:
        xr, yr = (0, max(w - cw, 0)), (0, max(h - ch, 0))
    else:
        xr, yr = _axis_range(ext[0], ext[2], cw, w), _axis_range(ext[1], ext[3], ch, h)
    return pick(0, *xr), pick(1, *yr)


def random_window(sample: Sample, rng: np.random.Generator, aspect: tuple[int, int] = (1, 1),
                  min_scale: float = 0.6) -> Window:
    """Random (x0, y0, cw, ch) of aspect (h, w) containing all faces; cw in [min_scale * widest fitting, widest]."""
    ah, aw = aspect
    fit, need = _window_widths(sample, aspect)
    lo = max(need, int(math.ceil(min_scale * fit)))
    cw = lo if lo >= fit else int(rng.integers(lo, fit + 1))
    ch = max(1, round(cw * ah / aw))
    x0, y0 = _place(sample, cw, ch, lambda _axis, a, b: int(rng.integers(a, b + 1)))
    return x0, y0, cw, ch


def centre_window(sample: Sample, aspect: tuple[int, int] = (1, 1)) -> Window:
    """Deterministic (x0, y0, cw, ch): the largest centred window of aspect (h, w), shifted minimally to
    contain all faces (grown to the faces' union when that is larger)."""
    ah, aw = aspect
    fit, need = _window_widths(sample, aspect)
    cw = max(fit, need)
    ch = max(1, round(cw * ah / aw))
    h, w = sample.image.shape[:2]
    centred = ((w - cw) // 2, (h - ch) // 2)
    return (*_place(sample, cw, ch, lambda axis, a, b: min(max(centred[axis], a), b)), cw, ch)


def random_square(sample: Sample, rng: np.random.Generator, min_scale: float = 0.6) -> tuple[int, int, int]:
    """Random (x0, y0, side) of a square that contains all faces; side in [min_scale * short side, short side]."""
    x0, y0, side, _ = random_window(sample, rng, (1, 1), min_scale)
    return x0, y0, side


def centre_square(sample: Sample) -> tuple[int, int, int]:
    """Deterministic (x0, y0, side): the largest centred square, shifted minimally to contain all faces."""
    x0, y0, side, _ = centre_window(sample, (1, 1))
    return x0, y0, side


def crop_top_left(x0: int, y0: int, cw: int, ch: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the window (x0, y0, cw, ch) after resizing the source by frame / window (SDXL's
    ``crop_coords_top_left`` convention: crop after resize)."""
    h, w = frame_size(size)
    return round(y0 * h / ch), round(x0 * w / cw)


def _crop_padded(arr: np.ndarray, x0: int, y0: int, cw: int, ch: int) -> np.ndarray:
    """arr[y0:y0+ch, x0:x0+cw] over the (H, W) axes given as axes 0, 1; outside the image is zero."""
    h, w = arr.shape[:2]
    out = np.zeros((ch, cw) + arr.shape[2:], arr.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + cw, w), min(y0 + ch, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def crop_window(sample: Sample, x0: int, y0: int, cw: int, ch: int, size: int | tuple[int, int]) -> Sample:
    """Crop [x0, x0+cw) x [y0, y0+ch) (zero-padded outside) and resize it to the frame `size` (R or (h, w)).

    image uint8 (H, W, 3) -> (h, w, 3) bilinear; masks uint8 (N, H, W) -> (N, h, w) nearest; boxes and
    landmarks follow: p' = (p - (x0, y0)) * (w / cw, h / ch). ``extra`` gains ``original_size`` and
    ``crop_top_left`` (module docstring).
    """
    oh, ow = frame_size(size)
    k = np.array([ow / cw, oh / ch])
    resize = (cw, ch) != (ow, oh)
    img = Image.fromarray(_crop_padded(sample.image, x0, y0, cw, ch))
    if resize:
        img = img.resize((ow, oh), Image.Resampling.BILINEAR)
    masks = np.zeros((len(sample.faces), oh, ow), np.uint8)
    for i, m in enumerate(sample.masks):
        mi = Image.fromarray(_crop_padded(m, x0, y0, cw, ch))
        masks[i] = np.asarray(mi.resize((ow, oh), Image.Resampling.NEAREST)) if resize else np.asarray(mi)
    offset = np.array([x0, y0], np.float64)
    faces = []
    for f in sample.faces:
        box = (np.asarray(f.box, np.float64).reshape(2, 2) - offset) * k
        lms = (np.asarray(f.landmarks, np.float64) - offset) * k
        faces.append(replace(f, box=box.reshape(-1).tolist(), landmarks=lms.tolist()))
    h, w = sample.image.shape[:2]
    extra = {**sample.extra, "original_size": (h, w), "crop_top_left": crop_top_left(x0, y0, cw, ch, (oh, ow))}
    return replace(sample, image=np.asarray(img), faces=faces, masks=masks, extra=extra)


def random_face_crop(sample: Sample, size: int | tuple[int, int], rng: np.random.Generator,
                     min_scale: float = 0.6) -> Sample:
    """Training transform: random window of the frame's aspect containing all faces, resized to the frame
    `size` (R: (R, R); a bucket: (h, w))."""
    return crop_window(sample, *random_window(sample, rng, frame_size(size), min_scale), size)


def eval_face_crop(sample: Sample, size: int | tuple[int, int]) -> Sample:
    """Evaluation transform: deterministic face-preserving window of the frame's aspect (plain resize for an
    image of that aspect), resized to the frame `size`."""
    return crop_window(sample, *centre_window(sample, frame_size(size)), size)
