"""Scoring the single-ID protocol's images: Face Sim (overall, per prompt category, per identity), CLIP-T /
CLIP-I (`ProtocolScores`), and FID against a reference folder (`compute_fid`, both protocols). Scores are
x100 (%), as in the paper's tables, except FID. The multi-ID splits: multi_scoring.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from src.conventions import uint8_to_unit
from src.evaluation import prompts as bp
from src.evaluation.identities import BenchIdentity
from src.evaluation.jobs import Job
from src.faces import load_rgb
from src.metrics import ClipScore, FaceSimilarity, image_face_score
from src.recognizers import FaceRecognizer


@dataclass
class ProtocolScores:
    """Accumulators of the single-ID protocol: Face Sim overall / per category / per identity, CLIP."""

    recognizer: FaceRecognizer
    clip: ClipScore | None
    face: FaceSimilarity = field(init=False)
    categories: dict[str, FaceSimilarity] = field(default_factory=dict)
    per_identity: dict[str, FaceSimilarity] = field(default_factory=dict)
    num_images: int = 0
    fid_images: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.face = FaceSimilarity(self.recognizer)

    def _metric(self, table: dict[str, FaceSimilarity], key: str) -> FaceSimilarity:
        if key not in table:
            table[key] = FaceSimilarity(self.recognizer)
        return table[key]

    def add(self, job: Job, images: list[np.ndarray], refs: list[BenchIdentity], keep_for_fid: bool) -> None:
        ref = torch.stack([r.embedding for r in refs])  # (R, D)
        category = bp.prompt_category(job.template)
        for image in images:
            faces, _boxes = self.recognizer.embed_faces(image)  # (K, D), (K, 4)
            score = image_face_score(faces, F.normalize(ref.float(), dim=-1))
            for m in (self.face, self._metric(self.categories, category)):
                m.add_score(score)
            for r in refs:
                self._metric(self.per_identity, r.name).add_score(score)
        score_clip(self.clip, job.prompt, images, refs)
        if keep_for_fid:
            self.fid_images += images
        self.num_images += len(images)

    def summary(self, fid: float | None) -> dict[str, Any]:
        """Numbers of this protocol (x100 except FID and counts)."""
        face = self.face.compute()
        out: dict[str, Any] = {"num_images": self.num_images, **{k: pct(v) for k, v in face.items()}}
        if self.clip is not None:
            out.update({k: round(float(v), 3) for k, v in self.clip.compute().items()})
        out["fid"] = fid
        out["per_category"] = {k: pct(m.compute()["face_sim"]) for k, m in self.categories.items()}
        out["per_identity"] = {k: pct(m.compute()["face_sim"]) for k, m in self.per_identity.items()}
        return out


def pct(v: Tensor | float) -> float | None:
    """x100 rounded to 3 decimals; None for nan (a mean no image contributed to)."""
    v = float(v)
    return None if math.isnan(v) else round(100 * v, 3)


def score_clip(clip: ClipScore | None, prompt: str, images: list[np.ndarray], refs: list[BenchIdentity]) -> None:
    """Add one job's images to `clip`: CLIP-T against the prompt, CLIP-I against each reference photo (both
    protocols; nothing without a CLIP model)."""
    if clip is None:
        return
    clip.update(images, texts=[prompt] * len(images))
    for r in refs:
        clip.update(images, references=[r.image] * len(images))


def compute_fid(images: list[np.ndarray], reference_dir: Path, feature: nn.Module | int, weights: Path | None) -> float:
    """FID of generated uint8 (H, W, 3) images against every image file in `reference_dir`.

    feature: an nn.Module taking (B, 3, H, W) in [-1, 1] (e.g. TorchvisionInceptionFeatures), or an
    Inception layer size for torch-fidelity's network with local `weights` (uint8 input).
    """
    from src.metrics import fid_metric

    files = sorted(p for p in reference_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if len(files) < 2 or len(images) < 2:
        raise ValueError(f"FID needs at least 2 reference images in {reference_dir} (found {len(files)}) "
                         f"and 2 generated images (got {len(images)})")
    metric = fid_metric(feature, weights=None if isinstance(feature, nn.Module) else weights)

    def batch(arrays: list[np.ndarray]) -> Tensor:
        x = torch.stack([uint8_to_unit(np.asarray(Image.fromarray(a).resize((299, 299), Image.BICUBIC)))
                         for a in arrays])  # (B, 3, 299, 299) in [-1, 1]
        return x if isinstance(feature, nn.Module) else ((x + 1) * 127.5).round().to(torch.uint8)

    for i in range(0, len(files), 16):
        metric.update(batch([load_rgb(p) for p in files[i : i + 16]]), real=True)
    for i in range(0, len(images), 16):
        metric.update(batch(images[i : i + 16]), real=False)
    return round(float(metric.compute()), 3)
