"""Synthetic identity dataset: procedurally drawn faces written as WebDataset shards (the embedded default).

Every identity ``syn_<k>`` is a fixed parameter set drawn from ``numpy.random.default_rng([IDENTITY_NAMESPACE, k])``,
so ``syn_7`` is the same person in every dataset, whatever ``--seed`` is; the seed drives only which images are
drawn (identity assignment, pose, lighting, background, captions).

What carries identity (stable across an identity's images):
- moderate colours: skin tone, hair colour and hair style, lip colour;
- details that diffusion noise destroys early (a lesson from a prototype, where flat-colour identities let the
  denoiser ignore *which* identity it was given): a face-paint pattern (stripes / checker / dots / rings) of an
  identity-specific period, orientation, colour and region, eye shape and iris colour, eyebrow thickness and tilt,
  moles, optional glasses.

Nuisance per image: in-plane rotation, scale, position, lighting (brightness, contrast, colour cast, a lighting
gradient) and background (a two-colour gradient plus random shapes).

Geometry is exact by construction: each identity is drawn once on a canonical canvas whose five landmarks sit on
``ARCFACE_TEMPLATE_112`` (``src.conventions``), then warped into the image with a known similarity transform, so the
five landmarks, the face box (the face oval's extent) and the masks (filled boxes) come from the drawing. All
coordinates are continuous pixel coordinates (pixel ``i`` spans ``[i, i+1)``, centre ``i + 0.5``), the convention
of PIL's affine warps and of ``src.alignment.align_face``.

The aligned recognition/CLIP crops are cut from the same scene rendered at ``crop_scale`` (default 4) times the image
resolution, as real preparation cuts them from the full-resolution photo before the image is resized for training.
Cut from the 64 px image itself, a 14 px face of a three-person image was blown up ~5x into a blur that lost the
identity's eyes, moles, glasses and pattern.

Layout written by :func:`generate` (and ``python -m datamodules.synthetic --out DIR``)::

    DIR/single/train-000000.tar ...          one face, training identities
    DIR/multi/train-000000.tar ...           2..max_faces faces, distinct training identities
    DIR/heldout/single_seen-*.tar            new images of training identities
    DIR/heldout/single_unseen-*.tar          identities never seen in training
    DIR/heldout/multi_seen-*.tar, multi_unseen-*.tar
    DIR/manifest.json                        counts, identities, seed, options, brace pattern of each split
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from datamodules.schema import SCHEMA_VERSION, Face, Sample, encode_sample
from src.alignment import align_face
from src.conventions import ARCFACE_TEMPLATE_112, FACE_RECOG_SIZE

IDENTITY_NAMESPACE = 31_415  # first entropy word of every identity's generator (identity k -> [NS, k])
CANVAS_OFFSET = 24.0  # canonical canvas = the 112 template frame plus this margin on each side (room for hair)
CANVAS_FRAME = 112 + 2 * CANVAS_OFFSET  # canonical canvas side, in template-frame units
FACE_CENTER = np.array([56.0, 64.0])  # centre of the face oval in the template frame
SUPERSAMPLE = 2  # drawing is done at 2x and box-filtered down (anti-aliasing)

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 50, 50), "blue": (50, 80, 200), "green": (60, 160, 70), "yellow": (225, 205, 60),
    "purple": (130, 60, 170), "orange": (230, 130, 40), "pink": (235, 145, 185), "teal": (40, 150, 150),
    "grey": (128, 128, 128), "white": (235, 235, 235), "brown": (120, 80, 50), "black": (30, 30, 30),
}
SKIN_TONES = np.array(
    [(241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172), (110, 70, 40)], np.float32
)
HAIR_COLOURS = np.array(
    [(25, 20, 18), (90, 60, 30), (220, 190, 120), (160, 60, 30), (170, 170, 170), (60, 90, 200), (60, 150, 80),
     (230, 120, 170), (245, 245, 240)], np.float32
)
IRIS_COLOURS = np.array(
    [(40, 90, 200), (40, 150, 60), (100, 60, 25), (120, 130, 140), (210, 150, 30), (140, 50, 190), (190, 30, 40)],
    np.float32,
)
LIP_COLOURS = np.array([(190, 60, 70), (220, 120, 140), (120, 60, 50), (130, 40, 110), (230, 80, 40)], np.float32)
HAIR_STYLES = ("bald", "short", "long", "bun", "afro")
PATTERNS = ("stripes", "checker", "dots", "rings")
PATTERN_REGIONS = ("face", "upper", "lower")
COUNT_WORDS = {1: "a person", 2: "two people", 3: "three people", 4: "four people", 5: "five people"}
CAPTION_TEMPLATES = (
    "a photo of {who} with a {bg} background",
    "{who} in front of a {bg} background",
    "a close-up portrait of {who}, {bg} background",
    "a picture of {who} against a {bg} wall",
)
SPLITS = ("single_train", "multi_train", "single_seen", "single_unseen", "multi_seen", "multi_unseen")


# ----------------------------------------------------------------------------------------------- identities
@dataclass(frozen=True)
class IdentityParams:
    """Stable features of one synthetic identity (template-frame units: the 112x112 aligned face)."""

    index: int
    skin: tuple[float, float, float]
    face_rx: float
    face_ry: float
    hair_colour: tuple[float, float, float]
    hair_style: str
    hairline: float
    fringe_amp: float
    fringe_period: float
    fringe_phase: float
    pattern: str
    pattern_period: float
    pattern_angle: float
    pattern_colour: tuple[float, float, float]
    pattern_alpha: float
    pattern_region: str
    eye_rx: float
    eye_ry: float
    iris_colour: tuple[float, float, float]
    brow_thickness: float
    brow_tilt: float
    lip_colour: tuple[float, float, float]
    lip_ry: float
    moles: tuple[tuple[float, float, float], ...]
    glasses: tuple[float, float, float] | None

    @property
    def label(self) -> str:
        return identity_label(self.index)


def identity_label(k: int) -> str:
    """The identity label written into faces.json for identity k."""
    return f"syn_{k}"


def manifest_identities(manifest: dict, split: str) -> list[int]:
    """Identity indices k of `syn_<k>` listed under manifest["identities"][split] ("train" or "unseen")."""
    try:
        labels = manifest["identities"][split]
    except KeyError as err:
        raise KeyError(f"manifest.json has no identities[{split!r}]") from err
    return [int(str(s).rsplit("_", 1)[1]) for s in labels]


def _jitter(rng: np.random.Generator, colour: np.ndarray, amount: float) -> tuple[float, float, float]:
    c = np.clip(colour + rng.uniform(-amount, amount, 3), 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def identity_params(k: int) -> IdentityParams:
    """Identity k's stable parameters; depends on k only (the same person in every generated dataset)."""
    rng = np.random.default_rng([IDENTITY_NAMESPACE, k])
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
    pattern_colour = tuple(255.0 * c for c in colorsys.hsv_to_rgb(hue, sat, val))
    n_moles = int(rng.integers(0, 4))
    moles = tuple(
        (float(rng.uniform(28, 84)), float(rng.uniform(58, 100)), float(rng.uniform(1.3, 2.4))) for _ in range(n_moles)
    )
    glasses = _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 20) if rng.uniform() < 0.3 else None
    return IdentityParams(
        index=k,
        skin=_jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 12),
        face_rx=float(rng.uniform(34, 40)),
        face_ry=float(rng.uniform(44, 50)),
        hair_colour=_jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 15),
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        hairline=float(rng.uniform(22, 32)),
        fringe_amp=float(rng.uniform(0, 5)),
        fringe_period=float(rng.uniform(8, 20)),
        fringe_phase=float(rng.uniform(0, 2 * math.pi)),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        pattern_period=float(rng.uniform(7, 12)),
        pattern_angle=float(rng.uniform(0, math.pi)),
        pattern_colour=(float(pattern_colour[0]), float(pattern_colour[1]), float(pattern_colour[2])),
        pattern_alpha=float(rng.uniform(0.45, 0.7)),
        pattern_region=PATTERN_REGIONS[rng.integers(len(PATTERN_REGIONS))],
        eye_rx=float(rng.uniform(5.5, 8.0)),
        eye_ry=float(rng.uniform(2.5, 5.0)),
        iris_colour=_jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 15),
        brow_thickness=float(rng.uniform(1.5, 4.0)),
        brow_tilt=float(rng.uniform(-0.35, 0.35)),
        lip_colour=_jitter(rng, LIP_COLOURS[rng.integers(len(LIP_COLOURS))], 15),
        lip_ry=float(rng.uniform(2.5, 5.0)),
        moles=moles,
        glasses=glasses,
    )


# ------------------------------------------------------------------------------------ canonical face render
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


# --------------------------------------------------------------------------------------- image composition
@dataclass(frozen=True)
class Placement:
    """A face's similarity pose: image = scale * R(angle) @ (frame - FACE_CENTER) + centre (final-image px)."""

    scale: float
    angle: float
    centre: tuple[float, float]

    def matrix(self) -> np.ndarray:
        """3x3 homogeneous map from template-frame coordinates to final-image coordinates."""
        c, s = math.cos(self.angle) * self.scale, math.sin(self.angle) * self.scale
        a = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        a[:2, 2] = np.asarray(self.centre) - a[:2, :2] @ FACE_CENTER
        return a


def _points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, np.float64) @ m[:2, :2].T + m[:2, 2]


def face_box(ip: IdentityParams, pl: Placement) -> np.ndarray:
    """Exact bounding box [x0, y0, x1, y1] of the rotated, scaled face oval (the face extent)."""
    c, s = math.cos(pl.angle), math.sin(pl.angle)
    wx = pl.scale * math.hypot(ip.face_rx * c, ip.face_ry * s)
    wy = pl.scale * math.hypot(ip.face_rx * s, ip.face_ry * c)
    cx, cy = pl.centre
    return np.array([cx - wx, cy - wy, cx + wx, cy + wy])


def extent_box(canon: CanonicalFace, pl: Placement) -> np.ndarray:
    """Bounding box of everything drawn for the face (hair included) in the final image."""
    x0, y0, x1, y1 = canon.extent
    corners = _points(pl.matrix(), np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
    return np.concatenate([corners.min(0), corners.max(0)])


def boxes_overlap(a: np.ndarray, b: np.ndarray, gap: float = 1.0) -> bool:
    """True when boxes [x0, y0, x1, y1] come closer than `gap` pixels."""
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def box_to_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """uint8 (H, W) mask of pixels whose centre lies in [x0, x1) x [y0, y1) (disjoint boxes -> disjoint masks)."""
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    inside_x = (xs >= box[0]) & (xs < box[2])
    inside_y = (ys >= box[1]) & (ys < box[3])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.uint8)


def face_width_range(n: int) -> tuple[float, float]:
    """Range of a face box's width, as a fraction of the image side, in an image of `n` faces.

    One face: 0.40-0.62. Several: the upper end falls as ``0.62 * n**-0.4`` (2 faces 0.31-0.47, 3 faces
    0.26-0.40), slower than ``1/n`` because a group photo's faces share the image in two dimensions. The size is
    what the router sees of a face: with :func:`place_faces`, 3-face images' faces are ~17 px wide at 64 px, ~4
    cells of the tiny VAE's 16x16 latent.
    """
    hi = 0.62 * n ** -0.4
    return 0.65 * hi, hi


def place_faces(
    rng: np.random.Generator, canons: Sequence[CanonicalFace], params: Sequence[IdentityParams], size: int,
    position_tries: int = 25,
) -> list[Placement]:
    """Random non-overlapping poses: every face box inside the image, no two drawn extents overlapping.

    Widths are drawn from :func:`face_width_range`; positions (and angles) are redrawn up to `position_tries`
    times before all faces shrink by 5% and are tried again. (Shrinking after every collision, as a first
    version did, left 3-face images' faces at 9-14 px, well under the drawn range.)
    """
    n = len(params)
    width_frac = rng.uniform(*face_width_range(n), n)
    for attempt in range(60 * position_tries):
        if attempt and attempt % position_tries == 0:
            width_frac *= 0.95  # crowded: shrink the faces
        placements: list[Placement] = []
        for ip, canon, frac in zip(params, canons, width_frac):
            scale = frac * size / (2 * ip.face_rx)
            angle = math.radians(rng.uniform(-15, 15))
            probe = face_box(ip, Placement(scale, angle, (0.0, 0.0)))  # centred at the origin
            lo_c, hi_c = 1.0 - probe[:2], size - 1.0 - probe[2:]
            if np.any(lo_c > hi_c):
                break
            pl = Placement(scale, angle, tuple(rng.uniform(lo_c, hi_c).tolist()))
            ext = extent_box(canon, pl)
            if any(boxes_overlap(ext, extent_box(c2, p2)) for c2, p2 in zip(canons, placements)):
                break
            placements.append(pl)
        if len(placements) == n:
            return placements
    raise RuntimeError(f"could not place {n} non-overlapping faces in a {size}px image")


def _background(rng: np.random.Generator, side: int) -> tuple[Image.Image, str]:
    """Two-colour linear gradient plus 0..3 random shapes; returns the image and the base colour's name."""
    name = list(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))]
    c1 = np.asarray(_jitter(rng, np.asarray(BACKGROUND_COLOURS[name], np.float32), 20), np.float32)
    c2 = np.clip(c1 + rng.uniform(-60, 60, 3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.arange(side, dtype=np.float32) + 0.5) / side - 0.5
    ramp = np.clip(0.5 + math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None], 0, 1)  # (S, S)
    bg = Image.fromarray((c1 * (1 - ramp[..., None]) + c2 * ramp[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * side
        w, h = rng.uniform(0.1, 0.5, 2) * side
        colour = tuple(int(v) for v in np.clip(c1 + rng.uniform(-80, 80, 3), 0, 255))
        shape = draw.ellipse if rng.uniform() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=colour)
    return bg, name


def _paste_face(canvas: Image.Image, canon: CanonicalFace, pl: Placement) -> None:
    """Warp the canonical face into the supersampled canvas (in place) with the placement's similarity."""
    # canvas px (supersampled) <- template frame: P = SUPERSAMPLE * A f; canonical px = (f + OFFSET) * px.
    to_canvas = np.diag([SUPERSAMPLE, SUPERSAMPLE, 1.0]) @ pl.matrix()
    frame_to_canon = np.array([[canon.px, 0, CANVAS_OFFSET * canon.px], [0, canon.px, CANVAS_OFFSET * canon.px],
                               [0, 0, 1.0]])
    inv = (frame_to_canon @ np.linalg.inv(to_canvas))[:2].reshape(-1)  # PIL maps output -> input
    size = canvas.size
    rgb = canon.rgb.transform(size, Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BILINEAR)
    alpha = canon.alpha.transform(size, Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BILINEAR)
    canvas.paste(rgb, (0, 0), alpha)


@dataclass(frozen=True)
class Lighting:
    """One image's lighting: contrast, brightness, per-channel colour cast and a linear gradient."""

    contrast: float
    brightness: float
    cast: np.ndarray  # (3,) float32
    angle: float
    gradient: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Lighting:
        contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(0.75, 1.2)
        cast = rng.uniform(0.9, 1.1, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        return cls(contrast, brightness, cast, angle, rng.uniform(0, 0.3))

    def apply(self, img: np.ndarray, mean: np.floating) -> np.ndarray:
        """uint8 (H, W, 3) in/out. `mean`: the grey level contrast pivots on (the training image's, also for the
        finer render the crops are cut from, so both get the same colour transform)."""
        h, w = img.shape[:2]
        x = img.astype(np.float32)
        x = (x - mean) * self.contrast + mean * self.brightness
        x *= self.cast
        gx = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
        gy = (np.arange(h, dtype=np.float32) + 0.5) / h - 0.5
        grad = 1.0 + self.gradient * (math.cos(self.angle) * gx[None, :] + math.sin(self.angle) * gy[:, None])
        x *= grad[..., None]
        return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def caption_for(rng: np.random.Generator, n_faces: int, background: str) -> str:
    """Templated caption naming how many people and the background colour."""
    who = COUNT_WORDS.get(n_faces, f"{n_faces} people")
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(who=who, bg=background)


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


def _render_source(
    background: Image.Image, params: Sequence[IdentityParams], placements: Sequence[Placement], size: int,
    scale: int, lighting: Lighting, mean: np.floating, cache: FaceCache,
) -> np.ndarray:
    """The same scene at `scale` x the image's resolution: the photograph the crops are cut from.

    The background is the image's own, upsampled (it only frames the crops); the faces are drawn again from
    canonical renders at the finer resolution with the image's placements scaled, then lit like the image.
    Returns uint8 (size * scale, size * scale, 3).
    """
    side = size * scale
    px = canonical_px(side)
    canvas = background.resize((side * SUPERSAMPLE, side * SUPERSAMPLE), Image.Resampling.BILINEAR)
    for ip, pl in zip(params, placements):
        big = Placement(pl.scale * scale, pl.angle, (pl.centre[0] * scale, pl.centre[1] * scale))
        _paste_face(canvas, cache.get(ip.index, px)[1], big)
    return lighting.apply(np.asarray(canvas.reduce(SUPERSAMPLE)), mean)


def render_sample(
    rng: np.random.Generator, identities: Sequence[int], size: int, clip_size: int, key: str, cache: FaceCache,
    crop_scale: int = 4,
) -> Sample:
    """Draw one image with one face per entry of `identities` and build its full schema Sample.

    The aligned crops are cut from the scene rendered at `crop_scale` x the image's resolution, as real
    preparation crops faces from the full-resolution photo before it is resized for training: a face 14 px
    wide in a 64 px three-person image is otherwise blown up ~5x into a blur that hides who it is. The
    image itself does not depend on `crop_scale` (1 cuts the crops from the image).

    Returns image uint8 (size, size, 3); masks uint8 (N, size, size); recog uint8 (N, 112, 112, 3);
    clip uint8 (N, clip_size, clip_size, 3). Faces are ordered left to right.
    """
    if crop_scale < 1:
        raise ValueError(f"render_sample: crop_scale must be >= 1, got {crop_scale}")
    px = canonical_px(size)
    entries = [cache.get(k, px) for k in identities]
    params = [e[0] for e in entries]
    canons = [e[1] for e in entries]
    placements = place_faces(rng, canons, params, size)
    canvas, bg_name = _background(rng, size * SUPERSAMPLE)
    background = canvas.copy() if crop_scale > 1 else None
    for canon, pl in zip(canons, placements):
        _paste_face(canvas, canon, pl)
    lighting = Lighting.draw(rng)
    unlit = np.asarray(canvas.reduce(SUPERSAMPLE))
    mean = unlit.astype(np.float32).mean()
    image = lighting.apply(unlit, mean)  # (S, S, 3)
    source = image
    if background is not None:
        source = _render_source(background, params, placements, size, crop_scale, lighting, mean, cache)
    order = sorted(range(len(params)), key=lambda i: placements[i].centre[0])
    faces, masks, recog, clip = [], [], [], []
    for i in order:
        box = face_box(params[i], placements[i])
        lms = _points(placements[i].matrix(), ARCFACE_TEMPLATE_112)  # (5, 2)
        faces.append(Face(box=[float(v) for v in box], landmarks=lms.tolist(), prob=1.0, identity=params[i].label))
        masks.append(box_to_mask(box, size, size))
        recog.append(align_face(source, lms * crop_scale, FACE_RECOG_SIZE))
        # Same field of view: at clip_size == 112 the CLIP crop is the recognition crop (one warp saved).
        clip.append(recog[-1].copy() if clip_size == FACE_RECOG_SIZE
                    else align_face(source, lms * crop_scale, clip_size))
    return Sample(
        key=key, image=image, caption=caption_for(rng, len(params), bg_name), faces=faces,
        masks=np.stack(masks), recog=np.stack(recog), clip=np.stack(clip), source="synthetic",
    )


# ------------------------------------------------------------------------------------------------ datasets
@dataclass
class SyntheticConfig:
    """Options of the synthetic dataset (the CLI flags of `python -m datamodules.synthetic`)."""

    size: int = 64
    identities: int = 64  # training identities: syn_0 .. syn_{identities-1}
    unseen: int = 16  # held-out identities: syn_{identities} .. syn_{identities+unseen-1}
    single: int = 4000
    multi: int = 3000
    heldout: int = 200  # images per held-out split
    max_faces: int = 3
    samples_per_shard: int = 500
    seed: int = 0
    clip_size: int = 112
    crop_scale: int = 4  # aligned crops cut from the scene rendered at this multiple of `size` (render_sample)
    jpeg_quality: int = 95
    progress: bool = True
    # Processes rendering shards (1: this process). Every sample depends only on (seed, split, index) and
    # its identities, so the shards are the same bytes whatever the count (a test checks it).
    workers: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent option."""
        if self.size < 16:
            raise ValueError(f"size={self.size}: images must be at least 16 px")
        if self.identities < 1:
            raise ValueError(f"identities={self.identities}: need at least one training identity")
        if self.multi and self.identities < 2:
            raise ValueError(f"multi={self.multi} needs identities >= 2 (got {self.identities})")
        if self.max_faces < 2 and (self.multi or self.heldout):
            raise ValueError(f"max_faces={self.max_faces}: multi-face images need at least 2")
        if self.heldout and self.unseen < 2:
            raise ValueError(f"heldout={self.heldout} needs unseen >= 2 for multi_unseen (got {self.unseen})")
        if self.crop_scale < 1:
            raise ValueError(f"crop_scale={self.crop_scale} must be >= 1 (1 cuts the crops from the image itself)")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard} must be >= 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")


@dataclass(frozen=True)
class SplitSpec:
    name: str  # key in the manifest
    folder: str
    prefix: str
    count: int
    ids: tuple[int, ...]  # identities this split draws from
    multi: bool


def split_specs(cfg: SyntheticConfig) -> list[SplitSpec]:
    """The six splits of the dataset (count 0 splits are listed and written as empty)."""
    seen = tuple(range(cfg.identities))
    unseen = tuple(range(cfg.identities, cfg.identities + cfg.unseen))
    return [
        SplitSpec("single_train", "single", "train", cfg.single, seen, False),
        SplitSpec("multi_train", "multi", "train", cfg.multi, seen, True),
        SplitSpec("single_seen", "heldout", "single_seen", cfg.heldout, seen, False),
        SplitSpec("single_unseen", "heldout", "single_unseen", cfg.heldout, unseen, False),
        SplitSpec("multi_seen", "heldout", "multi_seen", cfg.heldout, seen, True),
        SplitSpec("multi_unseen", "heldout", "multi_unseen", cfg.heldout, unseen, True),
    ]


def _identity_lists(rng: np.random.Generator, spec: SplitSpec, max_faces: int) -> list[list[int]]:
    """Identities of every image: balanced cycling for single-face splits, distinct draws for multi-face ones."""
    ids = np.asarray(spec.ids)
    if not spec.multi:
        reps = -(-spec.count // len(ids))
        order = np.concatenate([rng.permutation(ids) for _ in range(reps)])[: spec.count]
        return [[int(k)] for k in order]
    top = min(max_faces, len(ids))
    return [
        [int(k) for k in rng.choice(ids, size=int(rng.integers(2, top + 1)), replace=False)]
        for _ in range(spec.count)
    ]


def iter_split(
    spec: SplitSpec, cfg: SyntheticConfig, cache: FaceCache, start: int = 0, stop: int | None = None
) -> Iterator[Sample]:
    """Samples start..stop-1 of one split; sample i depends only on (seed, split, i) and its identities."""
    split_code = SPLITS.index(spec.name)
    identity_lists = _identity_lists(np.random.default_rng([cfg.seed, split_code]), spec, cfg.max_faces)
    for i in range(start, len(identity_lists) if stop is None else min(stop, len(identity_lists))):
        rng = np.random.default_rng([cfg.seed, split_code, i, 1])
        yield render_sample(rng, identity_lists[i], cfg.size, cfg.clip_size, f"{spec.prefix}_{i:07d}", cache,
                            cfg.crop_scale)


def shard_pattern(prefix: str, n_shards: int) -> str:
    """Brace pattern for shards prefix-000000.tar .. prefix-{n-1}.tar (a single name when n == 1)."""
    if n_shards <= 1:
        return f"{prefix}-000000.tar"
    return f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar"


def _n_shards(spec: SplitSpec, cfg: SyntheticConfig) -> int:
    return -(-spec.count // cfg.samples_per_shard) if spec.count else 0


def _write_shard(spec: SplitSpec, shard: int, cfg: SyntheticConfig, out: Path, cache: FaceCache) -> int:
    """Write shard `shard` of a split through a temporary name, renamed when complete; returns its sample count."""
    folder = out / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{spec.prefix}-{shard:06d}.tar"
    tmp = final.with_name(final.name + ".tmp")
    start = shard * cfg.samples_per_shard
    n = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)  # fixed mtime: reproducible tar bytes
        for sample in iter_split(spec, cfg, cache, start, start + cfg.samples_per_shard):
            writer.write(encode_sample(sample, jpeg_quality=cfg.jpeg_quality))
            n += 1
        writer.close()
    os.replace(tmp, final)
    return n


# Worker-process state: the canonical renders, sent once per worker (not once per shard).
_WORKER_CACHE = FaceCache()


def _init_worker(faces: dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]]) -> None:
    global _WORKER_CACHE
    _WORKER_CACHE = FaceCache(faces)


def _write_shard_in_worker(spec: SplitSpec, shard: int, cfg: SyntheticConfig, out: Path) -> int:
    return _write_shard(spec, shard, cfg, out, _WORKER_CACHE)


def _canonical_pair(k: int, pxs: tuple[int, ...]) -> dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]]:
    ip = identity_params(k)
    return {(k, px): (ip, render_canonical(ip, px)) for px in pxs}


def _pool(workers: int, **kwargs) -> ProcessPoolExecutor:
    # spawn: the parent may already run torch's thread pool, which a forked child must not inherit
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), **kwargs)


def _write_splits(specs: list[SplitSpec], cfg: SyntheticConfig, out: Path, bar: tqdm | None) -> None:
    """Every shard of every split: in this process (workers == 1), or over `cfg.workers` processes that first
    draw every identity's canonical faces between them."""
    jobs = [(spec, shard) for spec in specs for shard in range(_n_shards(spec, cfg))]
    if cfg.workers == 1:
        cache = FaceCache()
        for spec, shard in jobs:
            n = _write_shard(spec, shard, cfg, out, cache)
            if bar is not None:
                bar.update(n)
        return
    pxs = tuple(sorted({canonical_px(cfg.size), canonical_px(cfg.size * cfg.crop_scale)}))
    ids = sorted({k for spec in specs if spec.count for k in spec.ids})
    faces: dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]] = {}
    with _pool(cfg.workers) as ex:
        for part in ex.map(_canonical_pair, ids, [pxs] * len(ids), chunksize=max(1, len(ids) // (4 * cfg.workers))):
            faces.update(part)
    with _pool(cfg.workers, initializer=_init_worker, initargs=(faces,)) as ex:
        # the largest shards first, so the last ones to finish are short
        futures = [ex.submit(_write_shard_in_worker, spec, shard, cfg, out)
                   for spec, shard in sorted(jobs, key=lambda j: -j[0].multi)]
        for fut in as_completed(futures):
            n = fut.result()
            if bar is not None:
                bar.update(n)


def _split_entry(spec: SplitSpec, cfg: SyntheticConfig, out: Path) -> dict[str, object]:
    n_shards = _n_shards(spec, cfg)
    pattern = f"{spec.folder}/{shard_pattern(spec.prefix, n_shards)}" if n_shards else None
    if not n_shards:
        (out / spec.folder).mkdir(parents=True, exist_ok=True)
    return {
        "count": spec.count, "shards": n_shards, "pattern": pattern,
        "path_pattern": str(out / pattern) if pattern else None,
        "identities": [identity_label(k) for k in spec.ids], "multi": spec.multi,
    }


def generate(out: Path, cfg: SyntheticConfig) -> dict:
    """Generate the whole dataset under `out` and write `out/manifest.json`; returns the manifest dict."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = split_specs(cfg)
    total = sum(s.count for s in specs)
    bar = tqdm(total=total, desc="synthetic faces", unit="img", disable=not cfg.progress)
    _write_splits(specs, cfg, out, bar)
    bar.close()
    splits = {spec.name: _split_entry(spec, cfg, out) for spec in specs}
    manifest = {
        "schema": SCHEMA_VERSION,
        "generator": "datamodules.synthetic",
        "seed": cfg.seed,
        "options": {k: v for k, v in asdict(cfg).items() if k != "workers"},  # same bytes whatever the count
        "identities": {
            "train": [identity_label(k) for k in range(cfg.identities)],
            "unseen": [identity_label(k) for k in range(cfg.identities, cfg.identities + cfg.unseen)],
        },
        "counts": {name: s["count"] for name, s in splits.items()},
        "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def render_identity_crops(
    identity_ids: Sequence[int], n_per_id: int, seed: int = 0, size: int = 64, crop_scale: int = 4, workers: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned recognition crops of new single-face renders, for pretraining the tiny face backbone.

    Returns crops uint8 (M, 112, 112, 3) with M = len(identity_ids) * n_per_id, ordered identity-major, and
    labels int64 (M,) holding the identity index k of ``syn_<k>`` (the class index when ids == range(C)).
    Images are drawn like the dataset's (same nuisance) at `size` px, the crops cut like the dataset's (from the
    scene at `crop_scale` x `size`, see `render_sample`). Crop (k, j) depends only on (seed, k, j): `workers`
    processes, each drawing a contiguous run of identities, return the same arrays as one.
    """
    ids = [int(k) for k in identity_ids]
    if workers > 1 and len(ids) > 1:
        chunks = [c.tolist() for c in np.array_split(np.asarray(ids), min(workers, len(ids)))]
        with _pool(len(chunks)) as ex:
            parts = list(ex.map(render_identity_crops, chunks, [n_per_id] * len(chunks), [seed] * len(chunks),
                                [size] * len(chunks), [crop_scale] * len(chunks)))
        return np.concatenate([c for c, _ in parts]), np.concatenate([lb for _, lb in parts])
    cache = FaceCache()
    crops, labels = [], []
    for k in ids:
        for j in range(n_per_id):
            rng = np.random.default_rng([seed, 1000, k, j])
            s = render_sample(rng, [k], size, FACE_RECOG_SIZE, f"crop_{k}_{j}", cache, crop_scale)
            crops.append(s.recog[0])
            labels.append(k)
    empty = np.zeros((0, FACE_RECOG_SIZE, FACE_RECOG_SIZE, 3), np.uint8)
    return (np.stack(crops) if crops else empty), np.asarray(labels, dtype=np.int64)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic",
        description="Generate the synthetic identity dataset (procedurally drawn faces) as WebDataset shards.",
    )
    d = SyntheticConfig()
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--identities", type=int, default=d.identities, help="number of training identities")
    p.add_argument("--unseen", type=int, default=d.unseen, help="held-out identities never used in training")
    p.add_argument("--single", type=int, default=d.single, help="single-face training images")
    p.add_argument("--multi", type=int, default=d.multi, help="multi-face training images")
    p.add_argument("--heldout", type=int, default=d.heldout, help="images per held-out split")
    p.add_argument("--max-faces", type=int, default=d.max_faces, help="maximum faces per multi-face image")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--clip-size", type=int, default=d.clip_size, help="side of the aligned CLIP crop")
    p.add_argument("--crop-scale", type=int, default=d.crop_scale,
                   help="cut the aligned crops from the scene rendered at this multiple of --size (1: from the image)")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes rendering shards (default: one per core); the output is the same bytes")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    cfg = SyntheticConfig(
        size=a.size, identities=a.identities, unseen=a.unseen, single=a.single, multi=a.multi, heldout=a.heldout,
        max_faces=a.max_faces, samples_per_shard=a.samples_per_shard, seed=a.seed, clip_size=a.clip_size,
        crop_scale=a.crop_scale, jpeg_quality=a.jpeg_quality, progress=not a.no_progress, workers=a.workers,
    )
    manifest = generate(a.out, cfg)
    for name, s in manifest["splits"].items():
        print(f"{name:14s} {s['count']:6d} images  {s['pattern']}")
    return manifest


if __name__ == "__main__":
    main()
