"""Scene composition of one synthetic sample: face placement, background, lighting, caption, and the full
schema Sample with its exact boxes, landmarks, masks and aligned crops (`render_sample`)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from datamodules.schema import Face, Sample
from datamodules.synthetic.canonical import (
    CANVAS_FRAME,
    CANVAS_OFFSET,
    FACE_CENTER,
    SUPERSAMPLE,
    CanonicalFace,
    FaceCache,
    canonical_px,
)
from datamodules.synthetic.identities import IdentityParams, jitter_colour
from src.alignment import align_face
from src.conventions import ARCFACE_TEMPLATE_112, FACE_RECOG_SIZE

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 50, 50), "blue": (50, 80, 200), "green": (60, 160, 70), "yellow": (225, 205, 60),
    "purple": (130, 60, 170), "orange": (230, 130, 40), "pink": (235, 145, 185), "teal": (40, 150, 150),
    "grey": (128, 128, 128), "white": (235, 235, 235), "brown": (120, 80, 50), "black": (30, 30, 30),
}
COUNT_WORDS = {1: "a person", 2: "two people", 3: "three people", 4: "four people", 5: "five people"}
CAPTION_TEMPLATES = (
    "a photo of {who} with a {bg} background",
    "{who} in front of a {bg} background",
    "a close-up portrait of {who}, {bg} background",
    "a picture of {who} against a {bg} wall",
)


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
    c1 = np.asarray(jitter_colour(rng, np.asarray(BACKGROUND_COLOURS[name], np.float32), 20), np.float32)
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


def _warp_size(canvas_size: tuple[int, int], to_canvas: np.ndarray) -> tuple[int, int]:
    """The part of the canvas a canonical render is warped into: from the origin to the far corner of the
    canonical square's footprint (+2 px), within the canvas. Beyond it every output pixel samples outside the
    render, so its alpha is 0 and pasting it changes nothing; the part keeps the canvas's origin, and PIL
    computes each output pixel from its own coordinates, so the pasted bytes are those of a whole-canvas warp."""
    lo, hi = -CANVAS_OFFSET, CANVAS_FRAME - CANVAS_OFFSET  # the canonical square, template frame
    corners = _points(to_canvas, np.array([[lo, lo], [hi, lo], [lo, hi], [hi, hi]]))  # (4, 2) canvas px
    return (min(canvas_size[0], max(0, math.ceil(corners[:, 0].max()) + 2)),
            min(canvas_size[1], max(0, math.ceil(corners[:, 1].max()) + 2)))


def _paste_face(canvas: Image.Image, canon: CanonicalFace, pl: Placement) -> None:
    """Warp the canonical face into the supersampled canvas (in place) with the placement's similarity."""
    # canvas px (supersampled) <- template frame: P = SUPERSAMPLE * A f; canonical px = (f + OFFSET) * px.
    to_canvas = np.diag([SUPERSAMPLE, SUPERSAMPLE, 1.0]) @ pl.matrix()
    frame_to_canon = np.array([[canon.px, 0, CANVAS_OFFSET * canon.px], [0, canon.px, CANVAS_OFFSET * canon.px],
                               [0, 0, 1.0]])
    inv = (frame_to_canon @ np.linalg.inv(to_canvas))[:2].reshape(-1)  # PIL maps output -> input
    size = _warp_size(canvas.size, to_canvas)
    if size[0] == 0 or size[1] == 0:
        return
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

