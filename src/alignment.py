"""Five-landmark similarity alignment to the ArcFace template (no OpenCV needed).

`align_face(image, landmarks, size)` warps so that the five landmarks land on
ARCFACE_TEMPLATE_112 * size / 112: the 112 crop feeds the recognition backbone, a larger crop of the
same field of view (224 at SD1.5 scale, as insightface's `norm_crop`) feeds CLIP.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from src.conventions import ARCFACE_TEMPLATE_112, FACE_RECOG_SIZE


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama) mapping src (K, 2) to dst (K, 2): a 2x3 matrix."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1, 1] = -1
    rot = u @ d @ vt
    var_s = (s_c**2).sum() / len(src)
    scale = (sig * np.diag(d)).sum() / var_s
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], axis=1)


def template(size: int = FACE_RECOG_SIZE) -> np.ndarray:
    """The 5-point template for a square crop of `size` pixels."""
    return ARCFACE_TEMPLATE_112 * (size / FACE_RECOG_SIZE)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = FACE_RECOG_SIZE) -> np.ndarray:
    """uint8 (H, W, 3) image and (5, 2) landmarks -> uint8 (size, size, 3) aligned crop."""
    m = estimate_similarity(np.asarray(landmarks, dtype=np.float64), template(size))
    # PIL's affine maps output -> input coordinates: invert the 2x3 forward transform.
    full = np.vstack([m, [0, 0, 1]])
    inv = np.linalg.inv(full)[:2].reshape(-1)
    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    out = img.transform((size, size), Image.Transform.AFFINE, tuple(inv), resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 2x3 transform to (K, 2) points."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]
