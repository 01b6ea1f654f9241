"""Multi-identity metrics on hand-built embeddings whose cosines are known by construction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.metrics import MultiIdentityMetrics, MultiIdScore, greedy_match, hungarian_match, multi_id_score
from src.metrics.multi_id import id_conf
from tests.helpers import StubRecognizer

REFS = torch.eye(4, dtype=torch.float64)[:2]  # references e0, e1
F0 = torch.tensor([0.8, 0.2, 0.4, 0.4], dtype=torch.float64)  # unit: cosines 0.8 with e0, 0.2 with e1
F1 = torch.tensor([0.4, 0.8, 0.4, 0.2], dtype=torch.float64)  # unit: cosines 0.4 with e0, 0.8 with e1
PERFECT = torch.stack([F0, F1])  # sim [[0.8, 0.2], [0.4, 0.8]]
SWAPPED = torch.stack([F1, F0])  # sim [[0.4, 0.8], [0.8, 0.2]]
DUPLICATE = torch.stack([F0, F0])  # the first person twice: sim [[0.8, 0.2], [0.8, 0.2]]
MISSING = F0[None]  # one face for two people: sim [[0.8, 0.2]]
NO_FACE = torch.zeros(0, 4, dtype=torch.float64)


def figures(s: MultiIdScore) -> dict:
    """Everything but the pairing itself, flat (numbers only)."""
    out = {k: v for k, v in vars(s).items() if k not in ("matched", "matched_face")}
    return out | {f"matched{i}": v for i, v in enumerate(s.matched)}


def test_perfect_match():
    s = multi_id_score(PERFECT, REFS)
    assert s.matched_face == (0, 1)
    assert s.matched == pytest.approx((0.8, 0.8))
    assert s.sim_matched == pytest.approx(0.8)
    assert s.sim_mht == pytest.approx(0.8)
    assert s.leakage == pytest.approx((0.2 + 0.4) / 2)  # the off-diagonal pairs
    assert s.id_conf == pytest.approx(((0.8 - 0.4) / 0.8 + (0.8 - 0.2) / 0.8) / 2)  # 0.625
    assert s.count_ok and not s.duplicate
    assert s.greedy_min == pytest.approx(0.8)
    assert (s.num_refs, s.num_faces) == (2, 2)


def test_swapped_faces_are_paired_back():
    perfect, swapped = multi_id_score(PERFECT, REFS), multi_id_score(SWAPPED, REFS)
    assert swapped.matched_face == (1, 0)
    assert figures(swapped) == pytest.approx(figures(perfect))


def test_duplicated_face():
    s = multi_id_score(DUPLICATE, REFS)
    assert s.duplicate and s.count_ok
    assert sorted(s.matched_face) == [0, 1]  # both assignments tie; either pairs every reference
    assert s.matched == pytest.approx((0.8, 0.2))
    assert s.sim_matched == pytest.approx(0.5) and s.sim_mht == pytest.approx(0.5)
    assert s.id_conf == pytest.approx(0.0)  # s1 == s2 for both references
    assert s.leakage == pytest.approx(0.5)  # vs 0.3 for two distinct people
    assert s.greedy_min == pytest.approx(0.2)


def test_missing_face():
    s = multi_id_score(MISSING, REFS)
    assert s.matched_face == (0, None)
    assert s.matched == pytest.approx((0.8, 0.0))
    assert s.sim_matched == pytest.approx(0.8)  # MultiID-Bench: matched pairs only
    assert s.sim_mht == pytest.approx(0.4)  # MultiHuman-Testbench: the missing person counts 0
    assert s.leakage == pytest.approx(0.2)
    assert s.id_conf == pytest.approx(1.0)  # one face: s2 = 0 for every reference
    assert not s.count_ok and not s.duplicate
    assert s.greedy_min == 0.0


def test_no_face():
    s = multi_id_score(NO_FACE, REFS)
    assert s == MultiIdScore(2, 0, (0.0, 0.0), (None, None), None, 0.0, None, 0.0, False, False, 0.0)


def test_hungarian_right_where_greedy_is_wrong():
    sim = torch.tensor([[0.9, 0.8], [0.85, 0.1]], dtype=torch.float64)
    assert [(g, r) for g, r, _ in greedy_match(sim)] == [(0, 0), (1, 1)]  # 0.9 + 0.1
    pairs = hungarian_match(sim)  # 0.85 + 0.8, sorted by reference
    assert [(g, r) for g, r, _ in pairs] == [(1, 0), (0, 1)]
    assert [s for _, _, s in pairs] == pytest.approx([0.85, 0.8])

    # Unit vectors with exactly these face x reference cosines: Cholesky rows of a positive definite Gram
    # matrix over (face0, face1, ref0, ref1), with cos(face0, face1) = 0.6 and cos(ref0, ref1) = 0.5.
    gram = torch.tensor([[1.0, 0.6, 0.9, 0.8], [0.6, 1.0, 0.85, 0.1], [0.9, 0.85, 1.0, 0.5], [0.8, 0.1, 0.5, 1.0]],
                        dtype=torch.float64)
    vectors = torch.linalg.cholesky(gram)  # (4, 4), rows have Gram matrix `gram`
    s = multi_id_score(vectors[:2], vectors[2:])
    assert s.matched_face == (1, 0)
    assert s.matched == pytest.approx((0.85, 0.8))
    assert s.sim_matched == pytest.approx(0.825) and s.sim_mht == pytest.approx(0.825)
    assert s.leakage == pytest.approx((0.9 + 0.1) / 2)
    assert s.id_conf == pytest.approx(((0.9 - 0.85) / 0.9 + (0.8 - 0.1) / 0.8) / 2)
    assert s.duplicate  # both faces look most like reference 0
    assert s.greedy_min == pytest.approx(0.1)  # the paper's greedy protocol is stuck with 0.1


def test_hungarian_rectangular_and_errors():
    sim = torch.tensor([[0.1, 0.2], [0.7, 0.3], [0.6, 0.9]])  # 3 faces, 2 references
    assert [(g, r) for g, r, _ in hungarian_match(sim)] == [(1, 0), (2, 1)]
    assert hungarian_match(torch.zeros(0, 2)) == []
    with pytest.raises(ValueError, match="matrix"):
        hungarian_match(torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        hungarian_match(torch.tensor([[float("nan"), 0.1]]))
    with pytest.raises(ValueError, match="same recognizer"):
        multi_id_score(torch.ones(1, 3), REFS)


def test_id_conf_clamps_and_zeroes():
    # ref 0: s1 = 0.5, s2 = -0.5 -> (s1 - s2) / s1 = 2, clamped to 1; ref 1: s1 = -0.2 <= 0 -> 0.
    assert id_conf(torch.tensor([[0.5, -0.2], [-0.5, -0.4]])) == pytest.approx(0.5)
    assert id_conf(torch.zeros(0, 2)) == 0.0


# ----------------------------------------------------------------------------- the Metric
FOUR = [PERFECT, MISSING, NO_FACE, DUPLICATE]
# Means over those four images, from the per-image figures asserted above.
EXPECTED_FOUR = {
    "sim_matched": (0.8 + 0.8 + 0.5) / 3,  # the no-face image does not contribute
    "sim_mht": (0.8 + 0.4 + 0.0 + 0.5) / 4,
    "leakage": (0.3 + 0.2 + 0.5) / 3,
    "id_conf": (0.625 + 1.0 + 0.0 + 0.0) / 4,
    "count_acc": 2 / 4,
    "duplicate_rate": 1 / 4,
    "face_sim": (0.8 + 0.0 + 0.0 + 0.2) / 4,
    "no_face_rate": 1 / 4,
    "num_images": 4,
}


def scored(faces: list[torch.Tensor]) -> MultiIdentityMetrics:
    metric = MultiIdentityMetrics()
    for f in faces:
        metric.add_score(multi_id_score(f, REFS))
    return metric


def as_floats(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in out.items()}


def test_metric_means_over_images():
    assert as_floats(scored(FOUR).compute()) == pytest.approx(EXPECTED_FOUR)


def test_add_score_after_compute_is_counted():
    metric = scored([PERFECT])
    assert float(metric.compute()["sim_mht"]) == pytest.approx(0.8)
    metric.add_score(multi_id_score(MISSING, REFS))  # a cached result must not be returned
    assert float(metric.compute()["sim_mht"]) == pytest.approx((0.8 + 0.4) / 2)


def test_metric_nan_where_nothing_contributed():
    out = as_floats(scored([NO_FACE]).compute())
    assert math.isnan(out["sim_matched"]) and math.isnan(out["leakage"])
    assert out["no_face_rate"] == 1.0 and out["sim_mht"] == 0.0 and out["num_images"] == 1
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' notice: nothing seen
        empty = as_floats(MultiIdentityMetrics().compute())
    assert empty.pop("num_images") == 0 and all(math.isnan(v) for v in empty.values())


def test_update_through_recognizer_equals_add_score():
    metric = MultiIdentityMetrics(StubRecognizer([f.float() for f in FOUR]))
    images = [np.full((8, 8, 3), i, dtype=np.uint8) for i in range(len(FOUR))]
    refs = [REFS.float(), list(REFS.float()), REFS, REFS]  # (R, D) or a list of (D,)
    metric.update(images[:2], refs[:2])
    metric.update(images[2:], refs[2:])
    assert as_floats(metric.compute()) == pytest.approx(EXPECTED_FOUR)
    with pytest.raises(ValueError, match="recognizer"):
        MultiIdentityMetrics().update(images, refs)
    with pytest.raises(TypeError, match="FaceRecognizer"):
        MultiIdentityMetrics(object())
    with pytest.raises(ValueError, match="4 images but 3"):
        metric.update(images, refs[:3])


def test_merged_states_equal_one_metric_seeing_all_images():
    first, second = scored(FOUR[:2]), scored(FOUR[2:])
    first.merge_state(second)
    assert as_floats(first.compute()) == pytest.approx(EXPECTED_FOUR)
