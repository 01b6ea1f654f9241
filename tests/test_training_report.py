"""End-of-run reports: the identity probe's token identification on the tiny world."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from callbacks.training_report import IdentityProbe
from datamodules.datamodule import FaceShardDataModule
from tests.test_module import make_module


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


def test_identity_probe_measures_how_well_tokens_tell_people_apart(tiny_world):
    heldout = str(tiny_world / "data" / "heldout" / "single_seen-000000.tar")
    dm = FaceShardDataModule(train_shards=heldout, val_shards=heldout, multi_id=False, resolution=64, batch_size=4,
                             num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    m = make_module(tiny_world)
    m.train()
    probe = IdentityProbe(max_batches=2)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_shards=heldout, val_dataloader=lambda: _loader(dm)))
    own, other, acc = probe.measure(trainer, m)
    assert m.training  # the probe restores the mode it found
    assert own == other  # to_v_faceid starts at zero: identity cannot change the untrained model's output
    assert acc == 1.0  # each face's tokens are nearest to its twin's, and the labels line up with the tokens
    blank = SimpleNamespace(datamodule=SimpleNamespace(val_shards=heldout, val_dataloader=lambda: _loader(dm, True)))
    assert probe.measure(blank, m)[2] < 0.5  # identical tokens identify nobody
