"""Canonical face rendering: one identity drawn on the canonical canvas, its five landmarks exactly on
``ARCFACE_TEMPLATE_112``; the scene warps these renders into images (`scene`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
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


class _Painter:
    """Paints masks onto a supersampled colour/alpha canvas addressed in template-frame coordinates."""

    def __init__(self, px: int, fill: tuple[float, float, float]) -> None:
        side = int(CANVAS_FRAME * px * SUPERSAMPLE)
        centres = (np.arange(side, dtype=np.float32) + 0.5) / (px * SUPERSAMPLE) - CANVAS_OFFSET
        self.x, self.y = np.meshgrid(centres, centres)  # (G, G) template-frame coordinates of pixel centres
        self.rgb = np.empty((side, side, 3), np.float32)
        self.rgb[:] = fill  # hair colour under transparent pixels: anti-aliased edges blend into hair, not black
        self.alpha = np.zeros((side, side), np.float32)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def paint(self, mask: np.ndarray, colour: Sequence[float], opacity: float = 1.0, opaque: bool = True) -> None:
        self.rgb[mask] = self.rgb[mask] * (1.0 - opacity) + np.asarray(colour, np.float32) * opacity
        if opaque:
            self.alpha[mask] = 1.0

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Box-filter the supersampled canvas: uint8 (S, S, 3) colour and uint8 (S, S) alpha."""
        g = self.rgb.shape[0] // SUPERSAMPLE
        rgb = self.rgb.reshape(g, SUPERSAMPLE, g, SUPERSAMPLE, 3).mean((1, 3))
        alpha = self.alpha.reshape(g, SUPERSAMPLE, g, SUPERSAMPLE).mean((1, 3))
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8)


def _hair_back_mask(p: _Painter, ip: IdentityParams) -> np.ndarray:
    cx, cy, rx, ry = FACE_CENTER[0], FACE_CENTER[1], ip.face_rx, ip.face_ry
    top = cy - ry
    if ip.hair_style == "bald":
        return np.zeros_like(p.x, dtype=bool)
    cap = p.ellipse(cx, cy - 10, rx + 5, ry - 4) & (p.y < cy + 6)
    if ip.hair_style == "long":
        sides = (np.abs(p.x - cx) < rx + 9) & (p.y > cy - 10) & (p.y < cy + ry + 12)
        return cap | p.ellipse(cx, cy - 6, rx + 9, ry + 2) | sides
    if ip.hair_style == "bun":
        return cap | p.ellipse(cx, top - 8, 13, 11)
    if ip.hair_style == "afro":
        return p.ellipse(cx, cy - 14, rx + 17, ry + 4) & (p.y < cy + 18)
    return cap


def _pattern_mask(p: _Painter, ip: IdentityParams) -> np.ndarray:
    """The identity's fine pattern, a boolean field over the canvas (period in template units)."""
    c, s = math.cos(ip.pattern_angle), math.sin(ip.pattern_angle)
    u = (p.x - FACE_CENTER[0]) * c + (p.y - FACE_CENTER[1]) * s
    v = -(p.x - FACE_CENTER[0]) * s + (p.y - FACE_CENTER[1]) * c
    t = ip.pattern_period
    if ip.pattern == "stripes":
        return np.mod(u, t) < t / 2
    if ip.pattern == "checker":
        return (np.floor(u / t) + np.floor(v / t)) % 2 == 0
    if ip.pattern == "dots":
        du, dv = np.mod(u, t) - t / 2, np.mod(v, t) - t / 2
        return du**2 + dv**2 < (0.3 * t) ** 2
    r = np.sqrt((p.x - FACE_CENTER[0]) ** 2 + (p.y - 46.0) ** 2)  # rings around the forehead
    return np.mod(r, t) < t / 2


def _region_mask(p: _Painter, ip: IdentityParams) -> np.ndarray:
    if ip.pattern_region == "upper":
        return p.y < 58.0
    if ip.pattern_region == "lower":
        return p.y > 62.0
    return np.ones_like(p.x, dtype=bool)


def _brow_mask(p: _Painter, ip: IdentityParams, eye: np.ndarray, side: float) -> np.ndarray:
    tilt = ip.brow_tilt * side  # mirrored: both brows tilt up (or down) towards the temples
    c, s = math.cos(tilt), math.sin(tilt)
    dx, dy = p.x - eye[0], p.y - (eye[1] - ip.eye_ry - 5.5)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (np.abs(u) < ip.eye_rx + 2.5) & (np.abs(v) < ip.brow_thickness / 2)


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
    p.paint(face & _region_mask(p, ip) & _pattern_mask(p, ip), ip.pattern_colour, ip.pattern_alpha)
    if ip.hair_style != "bald":
        fringe = ip.hairline + ip.fringe_amp * np.sin(2 * np.pi * p.x / ip.fringe_period + ip.fringe_phase)
        p.paint(face & (p.y < fringe), ip.hair_colour)
    brow_colour = tuple(0.6 * c for c in ip.hair_colour)
    for eye, side in ((lm[0], 1.0), (lm[1], -1.0)):
        p.paint(_brow_mask(p, ip, eye, side), brow_colour)
        p.paint(p.ellipse(eye[0], eye[1], ip.eye_rx, ip.eye_ry), (240, 240, 235))
        iris_r = min(0.95 * ip.eye_ry, 3.6)
        p.paint(p.ellipse(eye[0], eye[1], iris_r, iris_r), ip.iris_colour)
        p.paint(p.ellipse(eye[0], eye[1], 0.45 * iris_r, 0.45 * iris_r), (10, 10, 10))
    if ip.glasses is not None:
        for eye in lm[:2]:
            r = np.sqrt((p.x - eye[0]) ** 2 + (p.y - eye[1]) ** 2)
            p.paint(np.abs(r - 11.0) < 0.9, ip.glasses)
        p.paint((np.abs(p.y - lm[0, 1]) < 0.9) & (np.abs(p.x - cx) < 6.7), ip.glasses)
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
