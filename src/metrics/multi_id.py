"""Multi-identity metrics of the newer multi-person benchmarks, next to the paper's greedy Face Sim.

Per image with R references and K detected faces, all similarities are cosines of L2-normalised
embeddings from one `FaceRecognizer` (sim = faces @ refs.T, (K, R), raw, not clamped):
- MultiID-Bench Sim(Ref): one-to-one Hungarian matching (`scipy.optimize.linear_sum_assignment`,
  maximising the total), mean of the min(K, R) matched cosines. Identity leakage: mean cosine of the
  NON-matched (face, reference) pairs (high = faces blend several people).
- MultiHuman-Testbench: count accuracy (K == R); ID similarity = sum of the Hungarian-matched cosines
  divided by R, so a missing face counts 0.
- ID-Conf (UMO): for each reference, s1 >= s2 its two highest cosines over the faces;
  min(1, (s1 - s2) / s1), 0 when s1 <= 0, averaged over references. With a single face there is no
  second candidate, so s2 = 0 and the score is 1 whenever s1 > 0. Low = two faces look like the same
  reference.
- The paper's Face Sim (FastComposer protocol): cosines clamped at 0, greedy one-to-one matching
  (`src.metrics.face.greedy_match`), minimum over references, 0 for an unmatched one. Unlike
  `FaceSimilarity`, a single-reference image takes its best face here (greedy), not its largest.
- Duplicated identity: two faces whose best reference (argmax of the raw cosines) is the same one;
  this includes a single-reference image with two faces of that person.
Values lie in [-1, 1] (cosines) or [0, 1] (rates, ID-Conf, Face Sim); tables multiply by 100.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from src.metrics.face import ImageBatch, References, as_reference_matrix, greedy_match, images_to_uint8
from src.recognizers import FaceRecognizer

SUM_STATES = (
    "num_images", "sim_matched_sum", "num_with_face", "sim_mht_sum", "leakage_sum", "num_leakage",
    "id_conf_sum", "num_count_ok", "num_duplicate", "greedy_min_sum", "num_no_face",
)


def hungarian_match(sim: Tensor) -> list[tuple[int, int, float]]:
    """Optimal one-to-one matching on a (G, R) similarity matrix (generated faces x references).

    Returns the min(G, R) pairs [(g, r, sim[g, r]), ...] maximising the total similarity, sorted by
    reference index r; [] when G or R is 0.
    """
    if sim.dim() != 2:
        raise ValueError(f"hungarian_match expects a (G, R) matrix, got shape {tuple(sim.shape)}")
    if sim.numel() == 0:
        return []
    values = sim.detach().double().cpu()  # (G, R)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"hungarian_match: similarity matrix has non-finite entries: {values.tolist()}")
    rows, cols = linear_sum_assignment(values.numpy(), maximize=True)
    pairs = [(int(g), int(r), float(sim[g, r])) for g, r in zip(rows, cols)]
    return sorted(pairs, key=lambda p: p[1])


@dataclass(frozen=True)
class MultiIdScore:
    """Multi-identity scores of one image with R references and K detected faces (see module docstring)."""

    num_refs: int
    num_faces: int
    matched: tuple[float, ...]  # (R,) Hungarian-matched raw cosine per reference, 0.0 when unmatched
    matched_face: tuple[int | None, ...]  # (R,) face matched to each reference, None when missing
    sim_matched: float | None  # MultiID-Bench Sim(Ref): mean of the matched cosines; None when K == 0
    sim_mht: float  # MultiHuman-Testbench ID similarity: sum of matched cosines / R
    leakage: float | None  # mean cosine of the non-matched (face, ref) pairs; None when there are none
    id_conf: float  # UMO ID-Conf averaged over references; 0 when K == 0
    count_ok: bool  # K == R
    duplicate: bool  # two faces share the same best reference
    greedy_min: float  # the paper's Face Sim: clamped cosines, greedy matching, min over references


def id_conf(sim: Tensor) -> float:
    """UMO ID-Conf of a (K, R) cosine matrix: mean over references of min(1, (s1 - s2) / s1).

    s1 >= s2 are the reference's two highest cosines over the K faces; s2 = 0 when K == 1; a reference
    with s1 <= 0 scores 0; 0.0 when K == 0.
    """
    k, r = sim.shape
    if k == 0:
        return 0.0
    top = sim.double().topk(min(k, 2), dim=0).values  # (min(K, 2), R)
    s1 = top[0]
    s2 = top[1] if k > 1 else torch.zeros_like(s1)
    conf = torch.where(s1 > 0, ((s1 - s2) / s1.clamp_min(1e-12)).clamp(max=1.0), torch.zeros_like(s1))  # (R,)
    return float(conf.mean())


def multi_id_score(faces: Tensor, refs: Tensor) -> MultiIdScore:
    """Score one image from face embeddings (K, D) (largest first) and references (R, D), both L2-normalised."""
    if faces.dim() != 2 or refs.dim() != 2 or refs.shape[0] == 0:
        raise ValueError(f"multi_id_score expects faces (K, D) and refs (R, D) with R >= 1, got "
                         f"{tuple(faces.shape)} and {tuple(refs.shape)}")
    k, r = faces.shape[0], refs.shape[0]
    if k > 0 and faces.shape[1] != refs.shape[1]:
        raise ValueError(f"face embeddings have D = {faces.shape[1]} but references D = {refs.shape[1]}: "
                         "embed both with the same recognizer")
    if k == 0:
        return MultiIdScore(r, 0, (0.0,) * r, (None,) * r, None, 0.0, None, 0.0, False, False, 0.0)
    sim = faces.double().cpu() @ refs.double().cpu().T  # (K, R)

    pairs = hungarian_match(sim)
    matched, matched_face = [0.0] * r, [None] * r
    unmatched = torch.ones(k, r, dtype=torch.bool)  # (K, R) pairs left out of the matching
    for g, j, s in pairs:
        matched[j], matched_face[j] = s, g
        unmatched[g, j] = False
    leakage = float(sim[unmatched].mean()) if bool(unmatched.any()) else None

    greedy = [0.0] * r
    for _, j, s in greedy_match(sim.clamp_min(0)):
        greedy[j] = s
    best = sim.argmax(dim=1)  # (K,) best reference of each face
    return MultiIdScore(
        num_refs=r,
        num_faces=k,
        matched=tuple(matched),
        matched_face=tuple(matched_face),
        sim_matched=sum(s for _, _, s in pairs) / len(pairs),
        sim_mht=sum(matched) / r,
        leakage=leakage,
        id_conf=id_conf(sim),
        count_ok=k == r,
        duplicate=bool(torch.bincount(best, minlength=r).max() > 1),
        greedy_min=min(greedy),
    )


class MultiIdentityMetrics(Metric):
    """Means over images of the multi-identity scores (`multi_id_score`).

    update(images, references): as `FaceSimilarity.update` (needs a recognizer): images are B uint8
    (H, W, 3) arrays or a (B, 3, H, W) tensor in [-1, 1]; references hold one entry per image, (D,),
    (R, D) or a list of R (D,) tensors from the same recognizer.
    add_score(s): accumulate an already computed `MultiIdScore` (no recognizer needed).
    compute() -> dict of 0-d float tensors: sim_matched (over images with a face), sim_mht, leakage (over
    images with a non-matched pair), id_conf, count_acc, duplicate_rate, face_sim (greedy_min),
    no_face_rate (over all images) and num_images. A mean no image contributed to is nan.
    States are sums (dist_reduce_fx="sum"), so it is DDP-safe and `merge_state` adds objects together.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, recognizer: FaceRecognizer | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if recognizer is not None and not isinstance(recognizer, FaceRecognizer):
            raise TypeError(f"{type(recognizer).__name__} does not implement FaceRecognizer")
        self.recognizer = recognizer
        for name in SUM_STATES:
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: ImageBatch, references: Sequence[References]) -> None:
        if self.recognizer is None:
            raise ValueError("MultiIdentityMetrics.update needs a recognizer (or call add_score with "
                             "precomputed MultiIdScore values)")
        arrays = images_to_uint8(images)
        if len(arrays) != len(references):
            raise ValueError(f"{len(arrays)} images but {len(references)} reference entries")
        for image, ref in zip(arrays, references):
            faces, _boxes = self.recognizer.embed_faces(image)  # (K, D), (K, 4)
            self._accumulate(multi_id_score(faces, as_reference_matrix(ref)))

    def add_score(self, s: MultiIdScore) -> None:
        """Accumulate one image's precomputed scores; counts as an update for torchmetrics' bookkeeping."""
        self._computed = None  # a compute() cached before this score is stale
        self._update_count += 1
        self._accumulate(s)

    def _accumulate(self, s: MultiIdScore) -> None:
        self.num_images += 1
        if s.sim_matched is not None:
            self.sim_matched_sum += s.sim_matched
            self.num_with_face += 1
        if s.leakage is not None:
            self.leakage_sum += s.leakage
            self.num_leakage += 1
        self.sim_mht_sum += s.sim_mht
        self.id_conf_sum += s.id_conf
        self.num_count_ok += float(s.count_ok)
        self.num_duplicate += float(s.duplicate)
        self.greedy_min_sum += s.greedy_min
        self.num_no_face += float(s.num_faces == 0)

    def compute(self) -> dict[str, Tensor]:
        def mean(total: Tensor, count: Tensor) -> Tensor:
            return total / count if count > 0 else torch.full_like(total, float("nan"))

        n = self.num_images
        out = {
            "sim_matched": mean(self.sim_matched_sum, self.num_with_face),
            "sim_mht": mean(self.sim_mht_sum, n),
            "leakage": mean(self.leakage_sum, self.num_leakage),
            "id_conf": mean(self.id_conf_sum, n),
            "count_acc": mean(self.num_count_ok, n),
            "duplicate_rate": mean(self.num_duplicate, n),
            "face_sim": mean(self.greedy_min_sum, n),
            "no_face_rate": mean(self.num_no_face, n),
            "num_images": n,
        }
        return {k: v.float() for k, v in out.items()}
