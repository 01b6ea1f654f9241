"""Canonical face rendering: one identity drawn on the canonical canvas, its five landmarks exactly on
``ARCFACE_TEMPLATE_112``; the scene warps these renders into images (`scene`)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from datamodules.synthetic.identities import IdentityParams, identity_params
from src.conventions import ARCFACE_TEMPLATE_112

CANVAS_OFFSET = 24.0  # canonical canvas = the 112 template frame plus this margin on each side (room for hair)
CANVAS_FRAME = 112 + 2 * CANVAS_OFFSET  # canonical canvas side, in template-frame units
FACE_CENTER = np.array([56.0, 64.0])  # centre of the face oval in the template frame
SUPERSAMPLE = 2  # drawing is done at 2x and box-filtered down (anti-aliasing)


@dataclass(frozen=True)
class CanonicalFace:
    """One identity drawn on the canonical canvas (landmarks on the 112 template, `px` canvas pixels per unit)."""

    rgb: Image.Image  # RGB, side = CANVAS_FRAME * px
    alpha: Image.Image  # L, 255 where the face/hair is opaque
    px: int  # canvas pixels per template-frame unit
    extent: tuple[float, float, float, float]  # opaque extent (hair included), template-frame units


class _Mask:
    """A boolean mask that is False outside a window of the canvas (pixel rows `rows`, columns `cols`).

    Shapes are tested only inside their bounding box: testing every shape over the whole supersampled canvas
    took most of a render's time. Each pixel's test is the same arithmetic as over the whole canvas, so the
    renders are the same bytes."""

    def __init__(self, rows: slice, cols: slice, m: np.ndarray) -> None:
        self.rows, self.cols, self.m = rows, cols, m  # m: bool (rows, cols)

    def over(self, rows: slice, cols: slice) -> np.ndarray:
        """This mask over another window: bool (rows, cols), False where it does not reach."""
        out = np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
        r0, r1 = max(rows.start, self.rows.start), min(rows.stop, self.rows.stop)
        c0, c1 = max(cols.start, self.cols.start), min(cols.stop, self.cols.stop)
        if r0 < r1 and c0 < c1:
            out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = self.m[
                r0 - self.rows.start : r1 - self.rows.start, c0 - self.cols.start : c1 - self.cols.start]
        return out

    def __and__(self, other: _Mask) -> _Mask:
        r0, c0 = max(self.rows.start, other.rows.start), max(self.cols.start, other.cols.start)
        rows = slice(r0, max(r0, min(self.rows.stop, other.rows.stop)))
        cols = slice(c0, max(c0, min(self.cols.stop, other.cols.stop)))
        return _Mask(rows, cols, self.over(rows, cols) & other.over(rows, cols))

    def __or__(self, other: _Mask) -> _Mask:
        rows = slice(min(self.rows.start, other.rows.start), max(self.rows.stop, other.rows.stop))
        cols = slice(min(self.cols.start, other.cols.start), max(self.cols.stop, other.cols.stop))
        return _Mask(rows, cols, self.over(rows, cols) | other.over(rows, cols))


# A test of pixel centres: x (1, W) and y (H, 1) template-frame coordinates -> bool broadcastable to (H, W).
Test = Callable[[np.ndarray, np.ndarray], "np.ndarray | bool"]


class _Painter:
    """Paints masks onto a supersampled colour/alpha canvas addressed in template-frame coordinates."""

    def __init__(self, px: int, fill: tuple[float, float, float]) -> None:
        side = int(CANVAS_FRAME * px * SUPERSAMPLE)
        self.scale = px * SUPERSAMPLE  # canvas pixels per template-frame unit
        # (G,) template-frame coordinate of each pixel centre, along x (columns) and y (rows) alike
        self.centres = (np.arange(side, dtype=np.float32) + 0.5) / self.scale - CANVAS_OFFSET
        self.rgb = np.empty((side, side, 3), np.float32)
        self.rgb[:] = fill  # hair colour under transparent pixels: anti-aliased edges blend into hair, not black
        self.alpha = np.zeros((side, side), np.float32)

    def _span(self, lo: float, hi: float) -> slice:
        """The pixels whose centres may lie in [lo, hi] (one pixel of margin each side), within the canvas."""
        side = len(self.centres)
        start = math.floor((lo + CANVAS_OFFSET) * self.scale - 0.5) - 1
        stop = math.ceil((hi + CANVAS_OFFSET) * self.scale - 0.5) + 2
        start, stop = min(max(start, 0), side), min(max(stop, 0), side)
        return slice(start, max(start, stop))

    def within(self, mask: _Mask, test: Test) -> _Mask:
        """The pixels of `mask` that pass `test`."""
        x, y = self.centres[None, mask.cols], self.centres[mask.rows, None]
        return _Mask(mask.rows, mask.cols, mask.m & test(x, y))

    def shape(self, box: tuple[float, float, float, float], test: Test) -> _Mask:
        """The pixels that pass `test`, which must be False outside `box` (x0, y0, x1, y1, template frame)."""
        rows, cols = self._span(box[1], box[3]), self._span(box[0], box[2])
        return self.within(_Mask(rows, cols, np.ones((rows.stop - rows.start, cols.stop - cols.start), bool)), test)

    def empty(self) -> _Mask:
        return _Mask(slice(0, 0), slice(0, 0), np.zeros((0, 0), bool))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> _Mask:
        return self.shape((cx - rx, cy - ry, cx + rx, cy + ry),
                          lambda x, y: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0)

    def paint(self, mask: _Mask, colour: Sequence[float], opacity: float = 1.0, opaque: bool = True) -> None:
        rgb, m = self.rgb[mask.rows, mask.cols], mask.m  # a view: writes land on the canvas
        rgb[m] = rgb[m] * (1.0 - opacity) + np.asarray(colour, np.float32) * opacity
        if opaque:
            self.alpha[mask.rows, mask.cols][m] = 1.0

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Box-filter the supersampled canvas: uint8 (S, S, 3) colour and uint8 (S, S) alpha."""
        rgb, alpha = _box_mean(self.rgb), _box_mean(self.alpha)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8)


def _box_mean(a: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block of (2G, 2G, ...) float32 -> (G, G, ...): the four pixels summed in the order
    `a.reshape(G, 2, G, 2, ...).mean((1, 3))` sums them (the same bits), ~5x faster than its strided reduction."""
    assert SUPERSAMPLE == 2
    return (((a[0::2, 0::2] + a[0::2, 1::2]) + a[1::2, 0::2]) + a[1::2, 1::2]) / np.float32(4)


def _hair_back_mask(p: _Painter, ip: IdentityParams) -> _Mask:
    cx, cy, rx, ry = FACE_CENTER[0], FACE_CENTER[1], ip.face_rx, ip.face_ry
    top = cy - ry
    if ip.hair_style == "bald":
        return p.empty()
    cap = p.within(p.ellipse(cx, cy - 10, rx + 5, ry - 4), lambda x, y: y < cy + 6)
    if ip.hair_style == "long":
        sides = p.shape((cx - rx - 9, cy - 10, cx + rx + 9, cy + ry + 12),
                        lambda x, y: (np.abs(x - cx) < rx + 9) & (y > cy - 10) & (y < cy + ry + 12))
        return cap | p.ellipse(cx, cy - 6, rx + 9, ry + 2) | sides
    if ip.hair_style == "bun":
        return cap | p.ellipse(cx, top - 8, 13, 11)
    if ip.hair_style == "afro":
        return p.within(p.ellipse(cx, cy - 14, rx + 17, ry + 4), lambda x, y: y < cy + 18)
    return cap


def _pattern_test(ip: IdentityParams) -> Test:
    """The identity's fine pattern, a test of pixel centres (period in template units)."""
    c, s = math.cos(ip.pattern_angle), math.sin(ip.pattern_angle)
    t = ip.pattern_period

    def test(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u = (x - FACE_CENTER[0]) * c + (y - FACE_CENTER[1]) * s
        v = -(x - FACE_CENTER[0]) * s + (y - FACE_CENTER[1]) * c
        if ip.pattern == "stripes":
            return np.mod(u, t) < t / 2
        if ip.pattern == "checker":
            return (np.floor(u / t) + np.floor(v / t)) % 2 == 0
        if ip.pattern == "dots":
            du, dv = np.mod(u, t) - t / 2, np.mod(v, t) - t / 2
            return du**2 + dv**2 < (0.3 * t) ** 2
        r = np.sqrt((x - FACE_CENTER[0]) ** 2 + (y - 46.0) ** 2)  # rings around the forehead
        return np.mod(r, t) < t / 2

    return test


def _region_test(ip: IdentityParams) -> Test:
    if ip.pattern_region == "upper":
        return lambda x, y: y < 58.0
    if ip.pattern_region == "lower":
        return lambda x, y: y > 62.0
    return lambda x, y: True


def _brow_mask(p: _Painter, ip: IdentityParams, eye: np.ndarray, side: float) -> _Mask:
    tilt = ip.brow_tilt * side  # mirrored: both brows tilt up (or down) towards the temples
    c, s = math.cos(tilt), math.sin(tilt)
    bx, by = eye[0], eye[1] - ip.eye_ry - 5.5  # the brow's centre
    half_u, half_v = ip.eye_rx + 2.5, ip.brow_thickness / 2
    reach = math.hypot(half_u, half_v)  # the rotated rectangle lies within this radius of its centre

    def test(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - bx, y - by
        u, v = dx * c + dy * s, -dx * s + dy * c
        return (np.abs(u) < half_u) & (np.abs(v) < half_v)

    return p.shape((bx - reach, by - reach, bx + reach, by + reach), test)


def render_canonical(ip: IdentityParams, px: int = 1) -> CanonicalFace:
    """Draw identity `ip` on the canonical canvas; its five landmarks are exactly ARCFACE_TEMPLATE_112."""
    lm = ARCFACE_TEMPLATE_112.astype(np.float64)
    p = _Painter(px, ip.hair_colour)
    cx, cy = FACE_CENTER
    p.paint(_hair_back_mask(p, ip), ip.hair_colour)
    ears = p.ellipse(cx - ip.face_rx, cy - 2, 5, 9) | p.ellipse(cx + ip.face_rx, cy - 2, 5, 9)
    p.paint(ears, ip.skin)
    face = p.ellipse(cx, cy, ip.face_rx, ip.face_ry)
    p.paint(face, ip.skin)
    p.paint(p.within(p.within(face, _region_test(ip)), _pattern_test(ip)), ip.pattern_colour, ip.pattern_alpha)
    if ip.hair_style != "bald":
        def under_fringe(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return y < ip.hairline + ip.fringe_amp * np.sin(2 * np.pi * x / ip.fringe_period + ip.fringe_phase)

        p.paint(p.within(face, under_fringe), ip.hair_colour)
    brow_colour = tuple(0.6 * c for c in ip.hair_colour)
    for eye, side in ((lm[0], 1.0), (lm[1], -1.0)):
        p.paint(_brow_mask(p, ip, eye, side), brow_colour)
        p.paint(p.ellipse(eye[0], eye[1], ip.eye_rx, ip.eye_ry), (240, 240, 235))
        iris_r = min(0.95 * ip.eye_ry, 3.6)
        p.paint(p.ellipse(eye[0], eye[1], iris_r, iris_r), ip.iris_colour)
        p.paint(p.ellipse(eye[0], eye[1], 0.45 * iris_r, 0.45 * iris_r), (10, 10, 10))
    if ip.glasses is not None:
        radius, half_width = 11.0, 0.9  # the rims, and the half-width of every line of the frame
        reach = radius + half_width
        for eye in lm[:2]:
            ring = p.shape((eye[0] - reach, eye[1] - reach, eye[0] + reach, eye[1] + reach),
                           lambda x, y, e=eye: np.abs(np.sqrt((x - e[0]) ** 2 + (y - e[1]) ** 2) - radius) < half_width)
            p.paint(ring, ip.glasses)
        bridge = p.shape((cx - 6.7, lm[0, 1] - half_width, cx + 6.7, lm[0, 1] + half_width),
                         lambda x, y: (np.abs(y - lm[0, 1]) < half_width) & (np.abs(x - cx) < 6.7))
        p.paint(bridge, ip.glasses)
    shade = tuple(0.8 * c for c in ip.skin)
    p.paint(p.ellipse(lm[2, 0], lm[2, 1] - 7.0, 2.5, 7.0), shade)
    for dx in (-3.5, 3.5):
        p.paint(p.ellipse(lm[2, 0] + dx, lm[2, 1] + 1.0, 1.3, 1.0), tuple(0.55 * c for c in ip.skin))
    mouth_c = (lm[3] + lm[4]) / 2
    p.paint(p.ellipse(mouth_c[0], mouth_c[1], (lm[4, 0] - lm[3, 0]) / 2, ip.lip_ry), ip.lip_colour)
    for mx, my, mr in ip.moles:
        p.paint(face & p.ellipse(mx, my, mr, mr), (60, 40, 30))
    rgb, alpha = p.finish()
    ys, xs = np.nonzero(alpha)
    extent = (xs.min() / px - CANVAS_OFFSET, ys.min() / px - CANVAS_OFFSET,
              (xs.max() + 1) / px - CANVAS_OFFSET, (ys.max() + 1) / px - CANVAS_OFFSET)
    return CanonicalFace(Image.fromarray(rgb), Image.fromarray(alpha), px, extent)


class FaceCache:
    """Canonical renders per (identity, px), built on first use (local to one generator run or worker)."""

    def __init__(self, faces: dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]] | None = None) -> None:
        self._faces: dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]] = dict(faces or {})

    def get(self, k: int, px: int) -> tuple[IdentityParams, CanonicalFace]:
        if (k, px) not in self._faces:
            ip = identity_params(k)
            self._faces[(k, px)] = (ip, render_canonical(ip, px))
        return self._faces[(k, px)]


def canonical_px(size: int) -> int:
    """Canonical canvas resolution for a target image size (1 px per template unit at 64 px images, <= 4)."""
    return int(min(4, max(1, math.ceil(size / 64))))
