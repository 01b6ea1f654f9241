"""Synthetic identities: the stable parameters of identity ``syn_<k>``, drawn from its own generator.

``identity_params(k)`` depends on k only, so ``syn_7`` is the same person in every generated dataset (see the
package docstring for what carries identity).
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

IDENTITY_NAMESPACE = 31_415  # first entropy word of every identity's generator (identity k -> [NS, k])
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


def jitter_colour(rng: np.random.Generator, colour: np.ndarray, amount: float) -> tuple[float, float, float]:
    """`colour` plus uniform noise in [-amount, amount] per channel, clipped to [0, 255]."""
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
    glasses = jitter_colour(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 20) if rng.uniform() < 0.3 else None
    return IdentityParams(
        index=k,
        skin=jitter_colour(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 12),
        face_rx=float(rng.uniform(34, 40)),
        face_ry=float(rng.uniform(44, 50)),
        hair_colour=jitter_colour(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 15),
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
        iris_colour=jitter_colour(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 15),
        brow_thickness=float(rng.uniform(1.5, 4.0)),
        brow_tilt=float(rng.uniform(-0.35, 0.35)),
        lip_colour=jitter_colour(rng, LIP_COLOURS[rng.integers(len(LIP_COLOURS))], 15),
        lip_ry=float(rng.uniform(2.5, 5.0)),
        moles=moles,
        glasses=glasses,
    )
