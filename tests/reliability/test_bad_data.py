"""Bad data: each kind of broken sample is a counted, logged skip naming shard and key (or a clear error
naming the pattern); the run goes on with the good samples."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds

from datamodules.datamodule import FaceShardDataModule


def raw_samples(world: Path, split: str = "single/train-000000.tar", n: int = 4) -> list[dict[str, Any]]:
    """The first `n` raw samples (bytes per field) of a tiny-world shard."""
    out = []
    for r in wds.tarfile_to_samples()(iter([{"url": str(world / "data" / split)}])):
        out.append({k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"})
        if len(out) == n:
            return out
    return out


def write_shard(path: Path, samples: list[dict[str, Any]]) -> Path:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _faces(s: dict) -> dict:
    return json.loads(s["faces.json"])


def more_faces_than_masks(s: dict) -> dict:
    meta = _faces(s)
    meta["faces"] = meta["faces"] * 2
    return {**s, "faces.json": json.dumps(meta).encode()}


def zero_faces(s: dict) -> dict:
    meta = _faces(s)
    meta["faces"] = []
    h, w = meta["height"], meta["width"]
    return {**s, "faces.json": json.dumps(meta).encode(), "masks.npz": npz(masks=np.zeros((0, h, w), np.uint8)),
            "recog.npz": npz(crops=np.zeros((0, 112, 112, 3), np.uint8)),
            "clip.npz": npz(crops=np.zeros((0, 56, 56, 3), np.uint8))}


def nan_crops(s: dict) -> dict:
    crops = np.load(io.BytesIO(s["recog.npz"]))["crops"].astype(np.float32)
    crops[0, 0, 0, 0] = np.nan
    return {**s, "recog.npz": npz(crops=crops)}


def out_of_range_masks(s: dict) -> dict:
    masks = np.load(io.BytesIO(s["masks.npz"]))["masks"] * 255
    return {**s, "masks.npz": npz(masks=masks.astype(np.uint8))}


CASES: dict[str, tuple[Callable[[dict], dict], str, bool]] = {
    # name: (corruption, expected reason in the log, multi-ID stream)
    "truncated_jpeg": (lambda s: {**s, "jpg": s["jpg"][: len(s["jpg"]) // 2]}, "not a readable image", False),
    "non_image_bytes": (lambda s: {**s, "jpg": b"GIF89a? no, just text"}, "not a readable image", False),
    "missing_caption": (lambda s: {k: v for k, v in s.items() if k != "txt"}, "missing field(s) ['txt']", False),
    "missing_faces_json": (lambda s: {k: v for k, v in s.items() if k != "faces.json"}, "'faces.json'", False),
    "malformed_faces_json": (lambda s: {**s, "faces.json": b'{"faces": [{"box": '}, "faces.json' is malformed",
                             False),
    "faces_json_without_boxes": (lambda s: {**s, "faces.json": b'{"faces": [{"prob": 1}]}'},
                                 "faces.json' is malformed", False),
    "more_faces_than_masks": (more_faces_than_masks, "faces but 1 masks", False),
    "zero_faces_multi_id": (zero_faces, "no face", True),
    "nan_in_crop_arrays": (nan_crops, "non-finite", False),
    "out_of_range_masks": (out_of_range_masks, "masks are 0/1", False),
}


def stream(pattern: str, multi: bool, workers: int = 0) -> list[dict]:
    dm = FaceShardDataModule(pattern, multi_id=multi, resolution=64, batch_size=2, num_workers=workers,
                             shuffle_buffer=0, seed=0)
    dm.setup("fit")
    return list(dm.train_dataloader())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_is_skipped_counted_and_logged(case, tiny_world, tmp_path, caplog):
    corrupt, reason, multi = CASES[case]
    good = raw_samples(tiny_world, "multi/train-000000.tar" if multi else "single/train-000000.tar")
    bad = corrupt(dict(good[1], __key__="bad_sample"))
    shard = write_shard(tmp_path / "shard-000000.tar", [good[0], bad, *good[1:]])
    with caplog.at_level(logging.WARNING, logger="datamodules.loader"):
        batches = stream(str(shard), multi)
    assert sorted(k for b in batches for k in b["key"]) == sorted(s["__key__"] for s in good)
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    msgs = [r.getMessage() for r in caplog.records if "bad_sample" in r.getMessage()]
    assert msgs, f"no log line names the bad key; got {[r.getMessage() for r in caplog.records]}"
    assert str(shard) in msgs[0] and reason in msgs[0], msgs[0]


def test_empty_shard_is_a_counted_skip_naming_it(tiny_world, tmp_path, caplog):
    good = write_shard(tmp_path / "shard-000000.tar", raw_samples(tiny_world))
    with tarfile.open(tmp_path / "shard-000001.tar", "w"):
        pass  # a valid tar with no member
    (tmp_path / "shard-000002.tar").write_bytes(b"")  # a zero-byte file
    with caplog.at_level(logging.WARNING, logger="datamodules.loader"):
        batches = stream(str(tmp_path / "shard-{000000..000002}.tar"), multi=False)
    assert sum(len(b["key"]) for b in batches) == 4
    assert sum(int(b["skipped"].sum()) for b in batches) == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "shard-000001.tar: shard holds no samples" in text and "shard-000002.tar" in text
    assert good.exists()


def test_resampled_stream_over_only_empty_shards_raises_instead_of_spinning(tmp_path):
    with tarfile.open(tmp_path / "empty-000000.tar", "w"):
        pass
    dm = FaceShardDataModule(str(tmp_path / "empty-000000.tar"), resolution=64, batch_size=2, num_workers=0,
                             resampled=True, epoch_length=2)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="empty-000000.tar"):
        next(iter(dm.train_dataloader()))


def test_non_existent_shard_pattern_stops_the_cli_naming_it(tiny_world, tmp_path):
    from src.cli.train import main
    from tests.reliability.helpers import fit_args

    missing = tmp_path / "nowhere" / "train-{000000..000003}.tar"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main([*fit_args(tiny_world, tmp_path), f"--data.train_shards={missing}", "--trainer.max_steps=1",
              "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"])
