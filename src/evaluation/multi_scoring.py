"""Scoring one multi-ID split (2, 3 or 4 people per image): `SplitScores`.

Per image, the recogniser's faces are matched to the group's references once (Hungarian matching,
`src.metrics.multi_id.multi_id_score`), and that one matching feeds every number of the split:
- `MultiIdentityMetrics`: the paper's Face Sim (greedy, min over references), Hungarian Sim(Ref) mean
  (MultiID-Bench) and sum / R (MultiHuman-Testbench), identity leakage, ID-Conf, count accuracy,
  duplicated-identity rate, no-face rate; overall and per prompt category;
- per identity: the Hungarian-matched cosine of that identity's reference (a missing face counts 0);
- routing accuracy at the last denoising step inside the detected faces: identity j's mask is the box of
  the face matched to reference j (`face_masks`); only for routed generation (an unrouted split has no
  router to score);
- CLIP-T (image vs prompt) and CLIP-I (image vs each reference);
- the contact sheet's entries (`SheetEntry`: image, boxes, matching, routing map).
Numbers are x100 (%) except FID and counts; a mean with no contributing image is None.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from src.evaluation import prompts as bp
from src.evaluation.identities import BenchIdentity
from src.evaluation.jobs import Job
from src.evaluation.scoring import pct, score_clip
from src.faces import box_mask
from src.metrics import ClipScore, RoutingAccuracy
from src.metrics.multi_id import MultiIdentityMetrics, MultiIdScore, multi_id_score
from src.recognizers import FaceRecognizer

UNROUTED_LABEL = "unrouted (no router)"
ROUTED_LABEL = "routed"


@dataclass
class SheetEntry:
    """One generation of the contact sheet.

    boxes: (K, 4) detected faces [x0, y0, x1, y1] in image pixels; matched_face: (R,) face index matched to
    each reference (None = missing); routing: (R, h, w) last-step routing weights (mean over layers), or None.
    """

    names: tuple[str, ...]
    prompt: str
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray
    matched_face: tuple[int | None, ...]
    matched: tuple[float, ...]
    routing: Tensor | None


def face_masks(h: int, w: int, boxes: Tensor, matched_face: tuple[int | None, ...]) -> tuple[Tensor, Tensor]:
    """Identity masks from matched faces: (1, R, h, w) box masks, (1, R) valid (False for an unmatched one)."""
    r = len(matched_face)
    masks = torch.zeros(1, r, h, w)
    valid = torch.zeros(1, r, dtype=torch.bool)
    for j, g in enumerate(matched_face):
        if g is not None:
            masks[0, j] = torch.from_numpy(box_mask(h, w, boxes[g].numpy())).float()
            valid[0, j] = True
    return masks, valid


def mean_routing(layers: list[Tensor]) -> Tensor | None:
    """Per-layer routing maps of one image [(1, R, h_l, w_l), ...] -> (R, h, w) mean at the finest resolution."""
    if not layers:
        return None
    h = max(m.shape[-2] for m in layers)
    w = max(m.shape[-1] for m in layers)
    up = [F.interpolate(m.float(), size=(h, w), mode="nearest") for m in layers]  # (1, R, h, w) each
    return torch.stack(up).mean(0)[0]


@dataclass
class SplitScores:
    """Accumulators of one multi-ID split (`people` identities per image); see the module docstring.

    unrouted: the split was generated without routers (routing accuracy is not scored).
    sheet_jobs: keys (names, prompt_index) of the jobs whose first image goes on the contact sheet.
    """

    people: int
    recognizer: FaceRecognizer
    clip: ClipScore | None
    unrouted: bool = False
    sheet_jobs: set[tuple[tuple[str, ...], int]] = field(default_factory=set)
    metrics: MultiIdentityMetrics = field(default_factory=MultiIdentityMetrics)
    categories: dict[str, MultiIdentityMetrics] = field(default_factory=dict)
    identity_sums: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum of matched, images]
    routing: RoutingAccuracy = field(default_factory=RoutingAccuracy)
    routing_images: int = 0
    num_images: int = 0
    fid_images: list[np.ndarray] = field(default_factory=list)
    sheet: list[SheetEntry] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return UNROUTED_LABEL if self.unrouted else ROUTED_LABEL

    def add(self, job: Job, images: list[np.ndarray], refs: list[BenchIdentity], routing: list[Tensor] | None,
            keep_for_fid: bool) -> None:
        """Score one job's images. routing: per layer (N, R, h, w) last-step maps of its N images, or None."""
        if len(refs) != self.people:
            raise ValueError(f"{self.people}-person split got a job with {len(refs)} identities: {job.names}")
        ref = F.normalize(torch.stack([r.embedding for r in refs]).float(), dim=-1)  # (R, D)
        category = bp.prompt_category(job.template)
        if category not in self.categories:
            self.categories[category] = MultiIdentityMetrics()
        for i, image in enumerate(images):
            faces, boxes = self.recognizer.embed_faces(image)  # (K, D), (K, 4)
            score = multi_id_score(F.normalize(faces.float(), dim=-1), ref)
            self.metrics.add_score(score)
            self.categories[category].add_score(score)
            for r, s in zip(refs, score.matched):
                acc = self.identity_sums.setdefault(r.name, [0.0, 0])
                acc[0] += s
                acc[1] += 1
            maps = [m[i : i + 1] for m in routing] if routing else []
            if maps and not self.unrouted:
                self.add_routing(image, boxes, score, maps)
            if i == 0 and (job.names, job.prompt_index) in self.sheet_jobs:
                self.sheet.append(SheetEntry(job.names, job.prompt, image, boxes.numpy().reshape(-1, 4),
                                             score.matched_face, score.matched, mean_routing(maps)))
        score_clip(self.clip, job.prompt, images, refs)
        if keep_for_fid:
            self.fid_images += images
        self.num_images += len(images)

    def add_routing(self, image: np.ndarray, boxes: Tensor, score: MultiIdScore, maps: list[Tensor]) -> None:
        """Routing accuracy of the last denoising step inside the detected faces matched to identities.

        boxes (K, 4) of this image; score: its Hungarian matching; maps: per layer (1, R, h, w) hard routing.
        Identity j's mask is the box of the face matched to reference j; an unmatched identity is invalid.
        """
        masks, valid = face_masks(image.shape[0], image.shape[1], boxes, score.matched_face)
        self.routing_images += 1
        for hard in maps:
            self.routing.update(hard.float(), masks, valid, torch.zeros(1, dtype=torch.long))

    def summary(self, fid: float | None) -> dict[str, Any]:
        """Numbers of this split (x100 except FID and counts)."""
        m = self.metrics.compute()
        out: dict[str, Any] = {"people": self.people, "mode": self.mode, "num_images": self.num_images}
        out.update({k: pct(v) for k, v in m.items() if k != "num_images"})
        if self.clip is not None:
            out.update({k: round(float(v), 3) for k, v in self.clip.compute().items()})
        out["fid"] = fid
        out["routing_accuracy"] = None
        if self.routing_images:
            out["routing_accuracy"] = pct(self.routing.compute()["all"])
        out["per_category"] = {k: pct(c.compute()["face_sim"]) for k, c in self.categories.items()}
        out["per_identity"] = {k: round(100 * s / n, 3) for k, (s, n) in self.identity_sums.items()}
        return out
