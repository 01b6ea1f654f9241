"""FaceShardDataModule over tiny synthetic shards: batch contract, stages, skips, errors, references, seeding."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules.collate import face_digest
from datamodules.datamodule import FaceShardDataModule
from datamodules.loader import resolve_shards
from datamodules.schema import Face, Sample, decode_sample, encode_sample
from datamodules.synthetic.dataset import SyntheticConfig, generate
from src.conventions import uint8_to_unit

RES = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("shards")
    m = generate(out, SyntheticConfig(size=64, identities=4, unseen=2, single=24, multi=12, heldout=4, max_faces=3,
                                      samples_per_shard=4, seed=1, progress=False))
    return {"out": out, "single": m["splits"]["single_train"]["path_pattern"],
            "multi": m["splits"]["multi_train"]["path_pattern"], "val": m["splits"]["single_seen"]["path_pattern"]}


def decoded(pattern: str) -> dict[str, Sample]:
    return {s.key: s for s in (decode_sample(r) for u in resolve_shards(pattern)
                               for r in wds.tarfile_to_samples()([{"url": u}]))}


def make_dm(pattern: str, **kw) -> FaceShardDataModule:
    args = dict(resolution=RES, batch_size=4, num_workers=0, shuffle_buffer=8, seed=0)
    args.update(kw)
    dm = FaceShardDataModule(pattern, **args)
    dm.setup("fit")
    return dm


def batches(loader) -> list[dict]:
    return list(loader)


def test_stage1_batch_contract(data: dict) -> None:
    torch.manual_seed(0)
    dm = make_dm(data["single"], p_other_reference=0.0)
    got = batches(dm.train_dataloader())
    assert sum(len(b["key"]) for b in got) == 24
    b = got[0]
    assert b["image"].shape == (4, 3, RES, RES) and b["image"].dtype == torch.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["face_recog"].shape == (4, 1, 3, 112, 112) and b["face_clip"].shape == (4, 1, 3, 112, 112)
    assert b["face_masks"].shape == (4, 1, RES, RES) and set(b["face_masks"].unique().tolist()) <= {0.0, 1.0}
    assert b["face_valid"].dtype == torch.bool and b["face_valid"].all()
    assert b["num_faces"].dtype == torch.long and b["num_faces"].tolist() == [1] * 4
    assert b["skipped"].dtype == torch.long and b["skipped"].sum() == 0
    assert isinstance(b["caption"][0], str) and all(i[0].startswith("syn_") for i in b["identity"])
    ref = decoded(data["single"])
    for i, key in enumerate(b["key"]):  # crops are the shard's own (p_other_reference=0)
        assert torch.equal(b["face_recog"][i, 0], uint8_to_unit(ref[key].recog[0]))
        assert torch.equal(b["face_clip"][i, 0], uint8_to_unit(ref[key].clip[0]))
        assert b["face_masks"][i, 0].sum() > 0


def test_stage1_keeps_the_largest_face_of_multi_face_images(data: dict) -> None:
    dm = make_dm(data["multi"], multi_id=False, p_other_reference=0.0)
    ref = decoded(data["multi"])
    for b in batches(dm.train_dataloader()):
        for i, key in enumerate(b["key"]):
            s = ref[key]
            areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in s.faces]
            j = int(np.argmax(areas))
            assert b["identity"][i] == [s.faces[j].identity]
            assert torch.equal(b["face_recog"][i, 0], uint8_to_unit(s.recog[j]))


def test_stage2_padding_and_validity(data: dict) -> None:
    dm = make_dm(data["multi"], multi_id=True, max_faces=3, batch_size=6)
    ref = decoded(data["multi"])
    counts = []
    for b in batches(dm.train_dataloader()):
        n_max = b["face_valid"].shape[1]
        assert n_max == int(b["num_faces"].max())
        assert (b["face_recog"].shape[:2] == b["face_clip"].shape[:2] == b["face_masks"].shape[:2]
                == (len(b["key"]), n_max))
        for i, key in enumerate(b["key"]):
            n = int(b["num_faces"][i])
            counts.append(n)
            assert n == len(ref[key].faces)
            assert b["face_valid"][i].tolist() == [True] * n + [False] * (n_max - n)
            assert b["identity"][i][n:] == [None] * (n_max - n)
            assert sorted(b["identity"][i][:n]) == sorted(f.identity for f in ref[key].faces)
            assert b["face_masks"][i, n:].sum() == 0 and b["face_recog"][i, n:].abs().sum() == 0
            assert all(b["face_masks"][i, k].sum() > 0 for k in range(n))
            assert b["face_masks"][i].sum(0).max() <= 1  # disjoint
    assert len(set(counts)) > 1  # variable face counts were actually exercised


def test_stage2_max_faces_drops_extra_faces(data: dict, caplog: pytest.LogCaptureFixture) -> None:
    dm = make_dm(data["multi"], multi_id=True, max_faces=2)
    with caplog.at_level(logging.WARNING):
        got = batches(dm.train_dataloader())
    assert max(int(b["num_faces"].max()) for b in got) == 2
    assert sum(len(b["key"]) for b in got) == 12
    drops = [r for r in caplog.records if "max_faces" in r.getMessage()]
    assert len(drops) == 1  # said once


def write_corrupt_shard(path: Path, good: list[Sample]) -> int:
    """A shard mixing good samples with 6 bad ones; returns the number of bad samples."""
    bad = []
    enc = [encode_sample(s) for s in good[:6]]
    t = dict(enc[0], __key__="bad_truncated")
    t["jpg"] = t["jpg"][: len(t["jpg"]) // 3]
    bad.append(t)
    t = dict(enc[1], __key__="bad_notimage")
    t["jpg"] = b"this is not an image"
    bad.append(t)
    t = dict(enc[2], __key__="bad_json")
    t["faces.json"] = b"{not json"
    bad.append(t)
    t = dict(enc[3], __key__="bad_nocaption")
    del t["txt"]
    bad.append(t)
    t = dict(enc[4], __key__="bad_box")
    meta = json.loads(t["faces.json"])
    meta["faces"][0]["box"] = [1.0, 2.0]
    t["faces.json"] = json.dumps(meta).encode()
    bad.append(t)
    h, w = good[0].image.shape[:2]
    noface = Sample(key="bad_noface", image=good[0].image, caption="x", faces=[], masks=np.zeros((0, h, w), np.uint8),
                    recog=np.zeros((0, 112, 112, 3), np.uint8), clip=np.zeros((0, 112, 112, 3), np.uint8))
    bad.append(encode_sample(noface))
    with wds.TarWriter(str(path), encoder=False) as w:
        for g, b in zip(good, bad):
            w.write(b)
            w.write(encode_sample(g))
        for g in good[len(bad):]:
            w.write(encode_sample(g))
    return len(bad)


def test_corrupt_samples_are_skipped_counted_and_logged(data: dict, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    good = list(decoded(data["single"]).values())[:8]
    n_bad = write_corrupt_shard(tmp_path / "bad-000000.tar", good)
    for workers in (0, 2):
        dm = make_dm(str(tmp_path / "bad-000000.tar"), num_workers=workers, batch_size=3)
        with caplog.at_level(logging.WARNING):
            got = batches(dm.train_dataloader())
        keys = [k for b in got for k in b["key"]]
        assert sorted(keys) == sorted(s.key for s in good)
        assert sum(int(b["skipped"].sum()) for b in got) == n_bad
    if not any("not a readable image" in r.getMessage() for r in caplog.records):
        pytest.fail("the skip reason was not logged")  # (worker processes log in their own process too)


def test_empty_or_missing_patterns_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="empty"):
        FaceShardDataModule("").setup("fit")
    missing = str(tmp_path / "nowhere" / "train-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FaceShardDataModule(missing).setup("fit")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        FaceShardDataModule(str(tmp_path / "empty_dir")).setup("fit")
    assert resolve_shards("pipe:cat a.tar") == ["pipe:cat a.tar"]  # commands are passed through


def test_pipe_and_directory_patterns_stream(data: dict) -> None:
    first = resolve_shards(data["single"])[0]
    dm = make_dm(f"pipe:cat {first}")
    assert sum(len(b["key"]) for b in dm.train_dataloader()) == 4
    dm = make_dm(str(Path(first).parent))  # a directory: all its .tar shards
    assert sum(len(b["key"]) for b in dm.train_dataloader()) == 24


def test_other_reference_comes_from_another_image_of_the_identity(data: dict) -> None:
    ref = decoded(data["single"])
    dm = make_dm(data["single"], p_other_reference=1.0, shuffle_buffer=1)
    swapped = 0
    for b in batches(dm.train_dataloader()):
        for i, key in enumerate(b["key"]):
            src = b["reference_key"][i][0]
            assert torch.equal(b["face_clip"][i, 0], uint8_to_unit(ref[key].clip[0]))  # CLIP: always the target
            assert torch.equal(b["face_recog"][i, 0], uint8_to_unit(ref[src].recog[0]))
            assert ref[src].faces[0].identity == ref[key].faces[0].identity
            swapped += src != key
    # 24 images of 4 identities: after each identity's first image every reference comes from another image
    assert swapped == 24 - 4


def test_set_multi_id_and_state_dict_restore_the_stage(data: dict) -> None:
    dm = make_dm(data["single"])
    assert int(next(iter(dm.train_dataloader()))["face_valid"].shape[1]) == 1
    dm.set_multi_id(True, data["multi"])
    b = next(iter(dm.train_dataloader()))
    multi_keys = set(decoded(data["multi"]))
    assert set(b["key"]) <= multi_keys and int(b["num_faces"].max()) > 1
    state = dm.state_dict()
    assert state["multi_id"] is True and state["train_shards"] == data["multi"]
    resumed = FaceShardDataModule(data["single"], resolution=RES, batch_size=4, num_workers=0)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    assert resumed.multi_id and set(next(iter(resumed.train_dataloader()))["key"]) <= multi_keys
    with pytest.raises(FileNotFoundError, match="missing"):
        dm.set_multi_id(True, "/missing/train-{0..3}.tar")

    # in the same stage, the configured shards win: data moved to another mount, a new validation set
    moved = {**state, "train_shards": "/old/mount/train-{0..3}.tar", "val_shards": "/old/mount/val.tar"}
    same = FaceShardDataModule(data["multi"], val_shards=data["val"], multi_id=True, resolution=RES, batch_size=4,
                               num_workers=0)
    same.load_state_dict(moved)
    assert (same.train_shards, same.val_shards) == (data["multi"], data["val"])
    same.setup("fit")
    assert set(next(iter(same.train_dataloader()))["key"]) <= multi_keys and next(iter(same.val_dataloader()))


def test_seeded_order_is_reproducible_and_reshuffled_per_epoch(data: dict) -> None:
    def run(seed: int, epochs: int = 1) -> list[list[str]]:
        dm = make_dm(data["single"], seed=seed, num_workers=2)
        loader = dm.train_dataloader()
        return [[k for b in loader for k in b["key"]] for _ in range(epochs)]

    a = run(0, epochs=2)
    b = run(0, epochs=2)
    assert a == b
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1])  # a new order each epoch, the same samples
    assert run(1)[0] != a[0]
    dm1, dm2 = make_dm(data["single"], seed=4), make_dm(data["single"], seed=4)
    for x, y in zip(dm1.train_dataloader(), dm2.train_dataloader()):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["face_masks"], y["face_masks"])


def test_val_loader_is_deterministic_and_uncropped(data: dict) -> None:
    dm = make_dm(data["single"], val_shards=data["val"], resolution=64, p_other_reference=1.0)
    ref = decoded(data["val"])
    k1 = [k for b in dm.val_dataloader() for k in b["key"]]
    k2 = [k for b in dm.val_dataloader() for k in b["key"]]
    assert k1 == k2 and sorted(k1) == sorted(ref)
    for b in dm.val_dataloader():
        for i, key in enumerate(b["key"]):
            assert torch.equal(b["image"][i], uint8_to_unit(np.array(ref[key].image)))  # same size: the image itself
            assert b["reference_key"][i] == [key]
    assert make_dm(data["single"]).val_dataloader() == []


def test_preview_batches_are_the_validation_ones_else_the_training_shards_in_order(data: dict) -> None:
    """The callbacks' fixed batches (routing maps, identity metrics): the validation loader's, and without
    val_shards the training shards read as validation shards are (no shuffle, eval crop), so a config
    without held-out data still gets its routing maps; both callbacks take that first batch."""
    from types import SimpleNamespace

    from callbacks.id_metrics import IdentityMetrics
    from callbacks.routing_maps import RoutingMapLogger

    with_val = make_dm(data["single"], val_shards=data["val"], resolution=64)
    assert [b["key"] for b in with_val.preview_dataloader()] == [b["key"] for b in with_val.val_dataloader()]
    plain = make_dm(data["multi"], multi_id=True, resolution=64, num_workers=2)
    as_val = make_dm(data["multi"], multi_id=True, resolution=64, val_shards=data["multi"])
    got, want = list(plain.preview_dataloader()), list(as_val.val_dataloader())
    assert [b["key"] for b in got] == [b["key"] for b in want] and len(got) == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, want) for k in ("image", "face_masks", "face_valid"))

    trainer = SimpleNamespace(datamodule=plain)
    module = SimpleNamespace(device=torch.device("cpu"), transfer_batch_to_device=lambda b, device, i: b)
    assert RoutingMapLogger()._fixed_batch(trainer, module)["key"] == got[0]["key"]
    assert IdentityMetrics(num_images=2).fixed_batch(trainer)["key"] == got[0]["key"][:2]


def test_resampled_epoch_length(data: dict) -> None:
    dm = make_dm(data["single"], resampled=True, epoch_length=5, num_workers=2, batch_size=2)
    loader = dm.train_dataloader()
    got = batches(loader)
    assert len(got) == 5 == len(loader)
    assert all(len(b["key"]) == 2 for b in got)


def test_faces_json_identity_none_is_kept(tmp_path: Path, data: dict) -> None:
    s = next(iter(decoded(data["single"]).values()))
    anon = Sample(key="anon", image=s.image, caption=s.caption,
                  faces=[Face(box=s.faces[0].box, landmarks=s.faces[0].landmarks, identity=None)],
                  masks=s.masks, recog=s.recog, clip=s.clip)
    with wds.TarWriter(str(tmp_path / "anon-0.tar"), encoder=False) as w:
        w.write(encode_sample(anon))
    b = next(iter(make_dm(str(tmp_path / "anon-0.tar"), p_other_reference=1.0).train_dataloader()))
    assert b["identity"] == [[None]] and b["reference_key"] == [["anon"]]


class _KeyRecorder(pl.LightningModule):
    """A minimal module: one linear layer on the image mean; records keys and skip counts per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.keys: dict[int, list[str]] = {}
        self.skipped = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.keys.setdefault(self.current_epoch, []).extend(batch["key"])
        self.skipped += int(batch["skipped"].sum())
        return self.lin(batch["image"].mean((2, 3))).pow(2).mean()  # (B, 3) -> scalar

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_runs_under_a_lightning_trainer_and_reshuffles_by_trainer_epoch(data: dict) -> None:
    torch.manual_seed(0)
    dm = FaceShardDataModule(data["single"], resolution=RES, batch_size=4, num_workers=0, shuffle_buffer=8, seed=0)
    model = _KeyRecorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert sorted(model.keys[0]) == sorted(model.keys[1]) and len(model.keys[0]) == 24
    assert model.keys[0] != model.keys[1]  # the trainer's epoch reseeds the shuffle
    assert model.skipped == 0


def test_loader_options_reach_the_dataloader_and_keep_the_batches(data: dict) -> None:
    """pin_memory / prefetch_factor are passed through (pinning defaults to CUDA's presence) and change
    nothing in what is loaded; a prefetch factor without workers is rejected."""
    dm = make_dm(data["single"], num_workers=2, prefetch_factor=4, pin_memory=False)
    loader = dm.train_dataloader()
    assert loader.prefetch_factor == 4 and loader.pin_memory is False
    assert make_dm(data["single"]).pin_memory == torch.cuda.is_available()
    plain = [b["key"] for b in make_dm(data["single"], num_workers=2).train_dataloader()]
    assert [b["key"] for b in loader] == plain
    with pytest.raises(ValueError, match="prefetch_factor=4 needs num_workers > 0"):
        make_dm(data["single"], num_workers=0, prefetch_factor=4)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("resolution", 500, "resolution=500 must be a positive multiple of 8"),
    ("batch_size", 0, "batch_size=0 must be >= 1"),
    ("num_workers", -1, "num_workers=-1 must be >= 0"),
    ("shuffle_buffer", -1, "shuffle_buffer=-1 must be >= 0"),
    ("buckets", [[1000, 1001]], r"\[1000, 1001\] has a side that is not a multiple of 8"),
])
def test_values_that_cannot_train_are_refused_naming_them(data: dict, option: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_dm(data["single"], **{option: value})


def test_face_digest_fingerprints_each_face_by_its_crops(data: dict) -> None:
    """`face_digest`: one non-zero fingerprint per face (0 in padded slots), the same for the same face in
    another epoch and order, different for different faces and for a crop that changes by one pixel."""
    dm = make_dm(data["multi"], multi_id=True, max_faces=3, batch_size=5)
    per_face: dict[tuple[str, str], int] = {}
    loader = dm.train_dataloader()
    orders = []
    for _ in range(2):  # two passes: two epochs, two shuffles
        got = batches(loader)
        orders.append([k for b in got for k in b["key"]])
        for b in got:
            d, valid = b["face_digest"], b["face_valid"]
            assert d.dtype == torch.long and d.shape == valid.shape
            assert (d[~valid] == 0).all() and (d[valid] != 0).all()
            for i, key in enumerate(b["key"]):
                for k in range(int(b["num_faces"][i])):
                    assert per_face.setdefault((key, b["identity"][i][k]), int(d[i, k])) == int(d[i, k])
    assert orders[0] != orders[1]
    assert len(set(per_face.values())) == len(per_face)  # distinct faces, distinct digests
    recog, clip = np.zeros((112, 112, 3), np.uint8), np.zeros((56, 56, 3), np.uint8)
    changed = recog.copy()
    changed[5, 7, 1] = 1
    assert face_digest(recog, clip) == face_digest(recog.copy(), clip.copy()) != face_digest(changed, clip)
