"""Metric logic on constructed cases: Face Sim (with a recogniser test double), CLIP, routing, FID."""
from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from src.metrics import (
    ClipScore,
    FaceSimilarity,
    RoutingAccuracy,
    TorchvisionInceptionFeatures,
    fid_metric,
    greedy_match,
    load_open_clip,
)
from src.metrics.fid import torch_fidelity_available
from tests.helpers import StubRecognizer


# ----------------------------------------------------------------------------- Face Sim
def img(i: int) -> np.ndarray:
    return np.full((8, 8, 3), i, dtype=np.uint8)


E = torch.eye(6)  # orthonormal basis e0..e5: cosines below are known by construction


def face_sim(outputs: list[torch.Tensor], refs: list) -> dict[str, float]:
    metric = FaceSimilarity(StubRecognizer(outputs))
    metric.update([img(i) for i in range(len(outputs))], refs)
    return {k: float(v) for k, v in metric.compute().items()}


def test_face_similarity_counts_a_score_added_after_compute():
    """`add_score` (the benchmark's path) after a `compute()`: the next compute sees it (torchmetrics caches
    compute() and clears the cache only in update())."""
    from src.metrics import image_face_score

    metric = FaceSimilarity(StubRecognizer([]))
    metric.add_score(image_face_score(E[0:1], E[0:1]))  # a perfect match: 1
    assert float(metric.compute()["face_sim"]) == pytest.approx(1.0)
    metric.add_score(image_face_score(E[1:2], E[0:1]))  # an orthogonal face: 0
    assert float(metric.compute()["face_sim"]) == pytest.approx(0.5)


def test_greedy_match_is_greedy_not_optimal():
    sim = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    # Greedy takes 0.9 first, leaving (1, 1); the optimal assignment would be (0, 1) + (1, 0).
    assert [(g, r) for g, r, _ in greedy_match(sim)] == [(0, 0), (1, 1)]
    assert greedy_match(sim)[1][2] == pytest.approx(0.1)


def test_greedy_match_ties_and_rectangular():
    assert [(g, r) for g, r, _ in greedy_match(torch.ones(2, 2))] == [(0, 0), (1, 1)]  # smaller flat index first
    sim = torch.tensor([[0.2, 0.3], [0.9, 0.4], [0.1, 0.8]])  # 3 faces, 2 references
    assert [(g, r) for g, r, _ in greedy_match(sim)] == [(1, 0), (2, 1)]
    assert greedy_match(torch.zeros(0, 2)) == []


def test_identical_faces_give_one():
    torch.manual_seed(0)
    refs = F.normalize(torch.randn(3, 16), dim=-1)
    out = face_sim([refs[i : i + 1] for i in range(3)], [refs[i] for i in range(3)])
    assert out["face_sim"] == pytest.approx(1.0, abs=1e-6)
    assert out["no_face_rate"] == 0.0
    assert "face_count_ok" not in out  # single-ID only


def test_single_id_uses_largest_face_and_clamps():
    largest_wrong = torch.stack([0.6 * E[0] + 0.8 * E[1], E[0]])  # largest face cos 0.6; second matches exactly
    assert face_sim([largest_wrong], [E[0]])["face_sim"] == pytest.approx(0.6)
    assert face_sim([-E[0:1]], [E[0]])["face_sim"] == 0.0  # negative cosine clamped at 0


def test_missing_face_scores_zero():
    out = face_sim([torch.zeros(0, 6), E[0:1]], [E[0], E[0]])
    assert out["face_sim"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert out["no_face_rate"] == pytest.approx(0.5)


def test_multi_id_minimum_of_matched_scores():
    faces = torch.stack([E[0], 0.6 * E[1] + 0.8 * E[2]])
    out = face_sim([faces], [torch.stack([E[0], E[1]])])
    assert out["face_sim"] == pytest.approx(0.6)  # min(1.0, 0.6)
    assert out["face_count_ok"] == 1.0 and out["duplicate_rate"] == 0.0


def test_multi_id_unmatched_reference_counts_zero():
    out = face_sim([E[0:1]], [[E[0], E[1]]])  # one face for two references (list form)
    assert out["face_sim"] == 0.0
    assert out["face_count_ok"] == 0.0


def test_duplicated_identity_is_counted():
    dup = torch.stack([E[0], 0.8 * E[0] + 0.6 * E[1]])  # both faces closest to reference 0
    ok = torch.stack([E[1], E[0]])
    out = face_sim([dup, ok], [torch.stack([E[0], E[1]])] * 2)
    assert out["duplicate_rate"] == pytest.approx(0.5)
    # dup: greedy pairs (0, r0)=1 then (1, r1)=0.6 -> 0.6; ok: both 1 -> mean 0.8.
    assert out["face_sim"] == pytest.approx(0.8)


def test_a_stranger_is_not_counted_as_a_duplicate_of_the_first_reference():
    """A face unlike every reference (cosines all negative) used to count as reference 0's (the argmax of
    similarities clamped at 0); by the cosines it is closest to reference 1, so the image holds no duplicated
    identity, as `multi_id_score` says too."""
    from src.metrics import image_face_score, multi_id_score

    refs = torch.stack([E[0], E[1]])
    stranger = F.normalize(-(0.98 * E[0] + 0.2 * E[1]), dim=0)  # cosine -0.98 with reference 0, -0.2 with 1
    faces = torch.stack([E[0], stranger])
    assert not image_face_score(faces, refs).duplicate
    assert not multi_id_score(faces, refs).duplicate


def test_tensor_images_and_accumulation():
    metric = FaceSimilarity(StubRecognizer([E[0:1], E[1:2]]))
    x = torch.stack([torch.full((3, 8, 8), i / 127.5 - 1) for i in range(2)])  # (2, 3, 8, 8) in [-1, 1]
    metric.update(x, [E[0], E[0]])  # scores 1, 0
    metric.update([img(0)], [E[0]])  # score 1
    assert float(metric.compute()["face_sim"]) == pytest.approx(2 / 3)
    metric.reset()
    metric.update([img(1)], [E[1]])
    assert float(metric.compute()["face_sim"]) == pytest.approx(1.0)


def test_rejects_non_recognizer_and_bad_shapes():
    with pytest.raises(TypeError, match="FaceRecognizer"):
        FaceSimilarity(object())
    metric = FaceSimilarity(StubRecognizer([E[0:1]]))
    with pytest.raises(ValueError, match="1 images but 2"):
        metric.update([img(0)], [E[0], E[0]])


# ----------------------------------------------------------------------------- routing accuracy
def two_id_masks() -> torch.Tensor:
    """(1, 2, 16, 16): id 0 covers the top-left 8x8 block, id 1 the bottom-right one."""
    m = torch.zeros(1, 2, 16, 16)
    m[0, 0, :8, :8] = 1
    m[0, 1, 8:, 8:] = 1
    return m


def one_hot(ids: torch.Tensor, n: int = 2) -> torch.Tensor:
    """(B, h, w) identity indices -> (B, n, h, w) one-hot maps."""
    return F.one_hot(ids, n).permute(0, 3, 1, 2).float()


def perfect_ids() -> torch.Tensor:
    ids = torch.zeros(1, 4, 4, dtype=torch.long)  # background routed to id 0 (ignored anyway)
    ids[0, 2:, 2:] = 1
    return ids


def routing(maps, masks, t, valid=None) -> dict[str, float]:
    metric = RoutingAccuracy()
    valid = torch.ones(maps.shape[:2], dtype=torch.bool) if valid is None else valid
    metric.update(maps, masks, valid, torch.tensor(t))
    return {k: float(v) for k, v in metric.compute().items()}


def test_routing_perfect_and_swapped():
    assert routing(one_hot(perfect_ids()), two_id_masks(), [100])["all"] == 1.0
    assert routing(one_hot(1 - perfect_ids()), two_id_masks(), [100])["all"] == 0.0


def test_routing_ignores_positions_outside_faces():
    ids = perfect_ids()
    ids[0, :2, 2:] = 1  # top-right and bottom-left are outside both faces: routed anywhere
    ids[0, 2:, :2] = 1
    assert routing(one_hot(ids), two_id_masks(), [100])["all"] == 1.0
    ids[0, 0, 0] = 1  # one of the 8 face positions wrong
    assert routing(one_hot(ids), two_id_masks(), [100])["all"] == pytest.approx(7 / 8)


def test_routing_bands_are_separated():
    maps = torch.cat([one_hot(perfect_ids()), one_hot(1 - perfect_ids())])  # (2, 2, 4, 4)
    out = routing(maps, two_id_masks().repeat(2, 1, 1, 1), [100, 800])
    assert out["t<250"] == 1.0 and out["t>=750"] == 0.0 and out["all"] == 0.5
    assert math.isnan(out["250<=t<500"]) and math.isnan(out["500<=t<750"])
    assert routing(one_hot(perfect_ids()), two_id_masks(), [250])["250<=t<500"] == 1.0  # edge goes up


def test_routing_invalid_slots_and_small_masks():
    masks = two_id_masks()
    valid = torch.tensor([[True, False]])
    # Slot 1 is padding: its mask is not counted, and routing there is never chosen.
    out = routing(one_hot(torch.ones(1, 4, 4, dtype=torch.long)), masks, [100], valid)
    assert out["all"] == 0.0  # only id 0's 4 positions counted; argmax over valid slots has no route
    small = torch.zeros(1, 2, 16, 16)
    small[0, 0, :2, :2] = 1  # covers a quarter of one 4x4 cell: below the 0.5 area threshold
    assert math.isnan(routing(one_hot(perfect_ids()), small, [100])["all"])


# ----------------------------------------------------------------------------- CLIP
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip():
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(**TINY_CLIP).eval(), open_clip.SimpleTokenizer()


def rand_images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(n)]


def test_clip_i_self_is_100_and_other_lower(tiny_clip):
    model, tok = tiny_clip
    a, b = rand_images(2, 0)
    same, other = ClipScore(model, tokenizer=tok), ClipScore(model, tokenizer=tok)
    same.update([a], references=[a])
    other.update([a], references=[b])
    assert float(same.compute()["clip_i"]) == pytest.approx(100.0, abs=1e-3)
    assert float(other.compute()["clip_i"]) < 100.0 - 1e-3
    assert "clip_t" not in same.compute()


def test_clip_t_matches_definition_and_tensor_input(tiny_clip):
    model, tok = tiny_clip
    metric = ClipScore(model, tokenizer=tok)
    images, texts = rand_images(2, 1), ["a man wearing a red hat", "a watercolor painting of a woman"]
    metric.update(images, texts=texts)
    with torch.no_grad():
        pix = torch.stack([metric.preprocess(Image.fromarray(a)) for a in images])
        cos = F.cosine_similarity(model.encode_image(pix), model.encode_text(tok(texts)), dim=-1)
    assert float(metric.compute()["clip_t"]) == pytest.approx(float(100 * cos.mean()), abs=1e-3)
    as_tensor = ClipScore(model, tokenizer=tok)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (2, 3, 40, 48)
    as_tensor.update(x, texts=texts)
    assert float(as_tensor.compute()["clip_t"]) == pytest.approx(float(metric.compute()["clip_t"]), abs=1e-3)


def test_clip_t_needs_tokenizer(tiny_clip):
    with pytest.raises(ValueError, match="tokenizer"):
        ClipScore(tiny_clip[0]).update(rand_images(1, 2), texts=["a man"])


def test_load_open_clip_from_local_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    name = f"tiny-test-clip-{uuid.uuid4().hex[:8]}"  # unique: open_clip's config registry is process-wide
    (tmp_path / f"{name}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**TINY_CLIP)
    save_file(ref.state_dict(), str(tmp_path / "clip.safetensors"))
    model, preprocess, tokenizer = load_open_clip(name, tmp_path / "clip.safetensors")
    assert not model.training
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    metric = ClipScore(model, preprocess, tokenizer)
    metric.update(rand_images(1, 3), texts=["a man"])
    assert math.isfinite(float(metric.compute()["clip_t"]))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_open_clip(name, tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- FID
class TinyFeatures(nn.Module):
    """Random linear features (B, 3, 8, 8) -> (B, 8)."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.float().flatten(1))


def test_fid_custom_features_zero_for_same_positive_for_shifted():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) * 2 - 1
    same = fid_metric(TinyFeatures())
    same.update(x, real=True)
    same.update(x, real=False)
    assert abs(float(same.compute())) < 1e-3
    shifted = fid_metric(same.inception)
    shifted.update(x, real=True)
    shifted.update(x + 0.5, real=False)
    assert float(shifted.compute()) > 0.1


def test_fid_inception_offline_errors(tmp_path):
    with pytest.raises(ValueError, match="custom module"):
        fid_metric(TinyFeatures(), weights="x.pth")
    with pytest.raises(ValueError, match="one of"):
        fid_metric(100)
    if not torch_fidelity_available():
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity"):
            fid_metric(2048, weights=tmp_path / "w.pth")
    else:
        with pytest.raises(FileNotFoundError, match="w.pth"):
            fid_metric(2048, weights=tmp_path / "w.pth")


def test_torchvision_inception_features_from_local_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    state = inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()
    torch.save(state, tmp_path / "inception_v3_google.pth")
    features = TorchvisionInceptionFeatures(tmp_path / "inception_v3_google.pth")
    assert torch.equal(features.net.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    features.train()
    assert not features.net.training  # BatchNorm statistics never change
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = features(x)
    assert out.shape == (2, 2048) and torch.equal(out, features(x))
    # FID itself is checked with TinyFeatures above (a 2048-d FID compute is too slow for a unit test).
    assert fid_metric(features).real_features_sum.shape == (2048,)
    torch.save({"fc.weight": state["fc.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth"):
        TorchvisionInceptionFeatures(tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        TorchvisionInceptionFeatures(tmp_path / "absent.pth")
