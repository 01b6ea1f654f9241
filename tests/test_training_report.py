"""End-of-run reports: the identity probe (paired gap +- SE, another person as "other", seen and
unseen splits, token identification) and the report.json every report writes."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.training_report import IdentityProbe, write_report
from datamodules.datamodule import FaceShardDataModule
from src.metrics.identity import other_identity_partners
from src.models import adapters
from tests.test_module import batch_from, make_module


def _doubled(batch: dict) -> dict:
    """Every sample twice (tensors and per-sample lists), so each face has an exact twin of its identity."""
    return {k: torch.cat([v, v]) if torch.is_tensor(v) else v + v if isinstance(v, list) else v
            for k, v in batch.items()}


def _loader(dm, blank: bool = False):
    for b in dm.val_dataloader():
        if blank:  # crops without any content: every face gets the same tokens
            b = {**b, "face_recog": torch.zeros_like(b["face_recog"]), "face_clip": torch.zeros_like(b["face_clip"])}
            b.pop("face_digest", None)
        yield _doubled(b)


def _faceid_on(m) -> None:
    """Give the face-ID value projections weights, so identity tokens change the UNet's output."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapters.faceid_parameters(m.unet).items():
            if "to_v_faceid" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_other_identity_partner_is_never_the_same_person():
    assert other_identity_partners([["a"], ["a"], ["b"], ["b"]]) == [2, 2, 0, 0]  # roll(1) would pair 1 with 0
    assert other_identity_partners([["a"], ["a"]]) == [None, None]  # one person: no "other identity"
    assert other_identity_partners([[None], ["a"], ["b"]]) == [None, 2, 1]  # unknown identity: no partner
    assert other_identity_partners([["a", "b"], ["b", "c"], ["d", None]]) == [2, 2, 0]  # multi-face: disjoint


def test_identity_gap_swaps_in_another_person_not_a_twin(tiny_world):
    """Two copies of each image side by side: roll(1) would give every second image its twin's (its own)
    tokens and a zero difference; the probe's partner is always another person, so every image differs."""
    m = make_module(tiny_world)
    _faceid_on(m)
    m.eval()
    batch = _doubled(batch_from(tiny_world, n=4))
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # twins next to each other
    batch = {k: v[order] if torch.is_tensor(v) else [v[i] for i in order] if isinstance(v, list) else v
             for k, v in batch.items()}
    own, other = m.identity_gap(batch, generator=torch.Generator().manual_seed(0))
    assert own.shape == other.shape == (8,)
    assert bool((own != other).all())
    same = {k: v[:1].expand(8, *v.shape[1:]) if torch.is_tensor(v) else [v[0]] * 8 if isinstance(v, list) else v
            for k, v in batch.items()}
    assert m.identity_gap(same)[0].numel() == 0  # a batch of one person has no "other identity"


def test_identity_probe_measures_how_well_tokens_tell_people_apart(tiny_world):
    heldout = str(tiny_world / "data" / "heldout" / "single_seen-000000.tar")
    dm = FaceShardDataModule(train_shards=heldout, val_shards=heldout, multi_id=False, resolution=64, batch_size=4,
                             num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    m = make_module(tiny_world)
    m.train()
    probe = IdentityProbe(max_batches=2, draws=2)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_shards=heldout, val_dataloader=lambda: _loader(dm)))
    r = probe.measure(trainer, m)["held-out"]
    assert m.training  # the probe restores the mode it found
    assert r["images"] == 16 and r["draws"] == 2
    # to_v_faceid starts at zero: identity cannot change the untrained model's output, on any image
    assert r["own"] == r["other"] and r["gap"] == 0 and r["gap_se"] == 0
    assert r["token_nn"] == 1.0  # each face's tokens are nearest to its twin's, and the labels line up
    blank = SimpleNamespace(datamodule=SimpleNamespace(val_shards=heldout, val_dataloader=lambda: _loader(dm, True)))
    assert probe.measure(blank, m)["held-out"]["token_nn"] < 0.5  # identical tokens identify nobody


@pytest.mark.slow
def test_identity_probe_reports_seen_and_unseen_splits_with_a_standard_error(tiny_world, capsys):
    """Each split is measured whole (max_batches permitting), with a non-zero standard error once identity
    changes the output; the printed figures are the ones in report.json."""
    heldout = tiny_world / "data" / "heldout"
    splits = {"seen": str(heldout / "single_seen-000000.tar"), "unseen": str(heldout / "single_unseen-000000.tar")}
    counts = json.loads((tiny_world / "data" / "manifest.json").read_text())["counts"]
    m = make_module(tiny_world)
    _faceid_on(m)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=64), is_global_zero=True, logger=None,
                              global_step=7, default_root_dir=".")
    probe = IdentityProbe(splits=splits, max_batches=100, draws=2, batch_size=8)
    probe.before = probe.measure(trainer, m)
    assert set(probe.before) == {"seen", "unseen"}
    assert probe.before["seen"]["images"] == counts["single_seen"]
    assert probe.before["unseen"]["images"] == counts["single_unseen"]
    for split in splits:
        r = probe.before[split]
        assert r["gap"] == pytest.approx(r["other"] - r["own"], abs=1e-9)  # a mean of paired differences
        assert r["gap_se"] > 0 and r["draws"] == 2
    probe.on_train_end(trainer, m)
    written = json.loads(Path("report.json").read_text())["identity_probe"]
    assert written["global_step"] == 7 and written["before"] == probe.before
    out = capsys.readouterr().out
    assert "after training, unseen identities" in out and " SE " in out


def test_write_report_keeps_other_sections_and_replaces_its_own(tmp_path):
    trainer = SimpleNamespace(logger=SimpleNamespace(root_dir=str(tmp_path / "runs" / "stage1")), is_global_zero=True)
    write_report(trainer, "a", {"x": 1})
    path = write_report(trainer, "b", {"y": 2})
    write_report(trainer, "a", {"x": 3})
    assert path == tmp_path / "runs" / "stage1" / "report.json"
    assert json.loads(path.read_text()) == {"a": {"x": 3}, "b": {"y": 2}}


def test_tiny_report_keeps_what_earlier_steps_wrote(tiny_world):
    """A re-run of `src.tiny` skips every finished step; the report still holds their figures."""
    from src.tiny import build

    first = json.loads((tiny_world / "tiny_report.json").read_text())
    again = build(tiny_world, seed=0)
    for key in ("face_backbone", "vae_loss", "unet_loss", "data"):
        assert again[key] == first[key]
    assert json.loads((tiny_world / "tiny_report.json").read_text())["unet_loss"] == first["unet_loss"]


@pytest.mark.slow
def test_tiny_quality_is_reproducible_and_measures_each_part(tiny_world):
    """`python -m src.tiny --quality`: the same world gives the same figures; every part is measured."""
    import math

    from src.tiny import measure_quality

    a = measure_quality(tiny_world, images=8, timesteps=2)
    b = measure_quality(tiny_world, images=8, timesteps=2)
    assert a == b
    for split in ("single_seen", "single_unseen"):
        assert math.isfinite(a[f"vae_mse_{split}"]) and a[f"vae_mse_{split}"] > 0
        assert math.isfinite(a[f"unet_eps_mse_{split}"]) and a[f"unet_eps_mse_{split}"] > 0
    assert a["vae_mse_single_seen"] != a["vae_mse_single_unseen"]  # two different held-out splits
    assert 0.0 <= a["face_accuracy_seen"] <= 1.0 and 0.0 <= a["face_accuracy_unseen"] <= 1.0
