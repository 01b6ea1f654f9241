"""Face Sim (single- and multi-ID) with greedy one-to-one matching, as in the FastComposer protocol.

Per image with R references and K detected faces (embeddings from a `FaceRecognizer`):
- single-ID (R = 1): cosine of the LARGEST detected face with the reference, clamped at 0; 0 when
  no face is found.
- multi-ID (R > 1): similarity matrix (K, R) clamped at 0, greedy one-to-one matching, the MINIMUM
  over references of the matched score; a reference left unmatched (K < R) counts 0.
Multi-ID diagnostics: right face count (K == R) and duplicated identity (two faces whose best
reference is the same one).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from src.recognizers import FaceRecognizer

ImageBatch = Sequence[np.ndarray] | Tensor
References = Tensor | Sequence[Tensor]


def greedy_match(sim: Tensor) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching on a (G, R) similarity matrix (generated faces x references).

    Repeatedly takes the largest remaining entry whose row and column are both unused, until
    min(G, R) pairs are made. Ties are broken by the smaller row-major flat index (smaller face index
    first, then smaller reference index). Returns [(g, r, sim[g, r]), ...] in the order chosen.
    """
    if sim.dim() != 2:
        raise ValueError(f"greedy_match expects a (G, R) matrix, got shape {tuple(sim.shape)}")
    g, r = sim.shape
    order = torch.sort(sim.detach().flatten().cpu(), descending=True, stable=True).indices.tolist()
    used_g, used_r, pairs = set(), set(), []
    for flat in order:
        i, j = divmod(flat, r)
        if i in used_g or j in used_r:
            continue
        used_g.add(i)
        used_r.add(j)
        pairs.append((i, j, float(sim[i, j])))
        if len(pairs) == min(g, r):
            break
    return pairs


@dataclass
class FaceScore:
    """Face Sim of one image: score in [0, 1], faces found, references, duplicated identity."""

    score: float
    num_faces: int
    num_refs: int
    duplicate: bool


def image_face_score(faces: Tensor, refs: Tensor) -> FaceScore:
    """Score one image from face embeddings (K, D) (largest first) and references (R, D).

    Both are L2-normalised so the matrix product is the cosine similarity.
    """
    k, r = faces.shape[0], refs.shape[0]
    if k == 0:
        return FaceScore(0.0, 0, r, False)
    cosine = faces.float() @ refs.float().to(faces.device).T  # (K, R)
    sim = cosine.clamp_min(0)
    if r == 1:
        return FaceScore(float(sim[0, 0]), k, r, False)  # largest face
    matched = [0.0] * r
    for _, j, s in greedy_match(sim):
        matched[j] = s
    best = cosine.argmax(dim=1)  # (K,) best reference of each face (unclamped: as multi_id_score's)
    duplicate = bool(torch.bincount(best, minlength=r).max() > 1)
    return FaceScore(min(matched), k, r, duplicate)


def images_to_uint8(images: ImageBatch) -> list[np.ndarray]:
    """List of uint8 (H, W, 3) arrays, or a (B, 3, H, W) tensor in [-1, 1] -> list of uint8 HWC."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
        return list(x.permute(0, 2, 3, 1).cpu().numpy())
    return [np.asarray(im) for im in images]


def as_reference_matrix(ref: References) -> Tensor:
    """One image's references: (D,), (R, D) or a sequence of (D,) -> (R, D), L2-normalised."""
    if not isinstance(ref, Tensor):
        ref = torch.stack(list(ref))
    if ref.dim() == 1:
        ref = ref[None]
    if ref.dim() != 2 or ref.shape[0] == 0:
        raise ValueError(f"references must be (D,), (R, D) or a list of (D,), got shape {tuple(ref.shape)}")
    return F.normalize(ref.float(), dim=-1)


class FaceSimilarity(Metric):
    """Mean Face Sim over images, plus no-face rate and (when multi-ID images were seen) face-count
    accuracy and duplicated-identity rate.

    update(images, references):
        images:     list of B uint8 (H, W, 3) arrays, or a (B, 3, H, W) tensor in [-1, 1].
        references: B entries, one per image: a (D,) tensor (single-ID), or (R, D) / list of R (D,)
                    tensors (multi-ID), embedded by the same recogniser.
    compute() -> dict of 0-d tensors: face_sim, no_face_rate (all images); face_count_ok and
    duplicate_rate (over multi-ID images only; present only when there were any).
    States are sums (dist_reduce_fx="sum"), so it is DDP-safe.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, recognizer: FaceRecognizer, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(recognizer, FaceRecognizer):
            raise TypeError(f"{type(recognizer).__name__} does not implement FaceRecognizer")
        self.recognizer = recognizer
        for name in ("score_sum", "num_images", "num_no_face", "num_multi", "num_count_ok", "num_duplicate"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: ImageBatch, references: Sequence[References]) -> None:
        arrays = images_to_uint8(images)
        if len(arrays) != len(references):
            raise ValueError(f"{len(arrays)} images but {len(references)} reference entries")
        for image, ref in zip(arrays, references):
            faces, _boxes = self.recognizer.embed_faces(image)  # (K, D), (K, 4)
            self._accumulate(image_face_score(faces, as_reference_matrix(ref)))

    def add_score(self, s: FaceScore) -> None:
        """Accumulate one image's precomputed score; counts as an update for torchmetrics' bookkeeping (which
        otherwise clears its cached compute() and counts updates only inside update())."""
        self._computed = None
        self._update_count += 1
        self._accumulate(s)

    def _accumulate(self, s: FaceScore) -> None:
        self.score_sum += s.score
        self.num_images += 1
        self.num_no_face += float(s.num_faces == 0)
        if s.num_refs > 1:
            self.num_multi += 1
            self.num_count_ok += float(s.num_faces == s.num_refs)
            self.num_duplicate += float(s.duplicate)

    def compute(self) -> dict[str, Tensor]:
        n = self.num_images.clamp_min(1)
        out = {"face_sim": self.score_sum / n, "no_face_rate": self.num_no_face / n}
        if self.num_multi > 0:
            out["face_count_ok"] = self.num_count_ok / self.num_multi
            out["duplicate_rate"] = self.num_duplicate / self.num_multi
        return {k: v.float() for k, v in out.items()}
