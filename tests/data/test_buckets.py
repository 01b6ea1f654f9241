"""Aspect-ratio buckets: the closest bucket per sample, one bucket per batch, every sample once per epoch,
size conditioning from the crop, and the resume position in batches."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds

from datamodules.buckets import BUCKET_PRESETS, batch_by_bucket, nearest_bucket, resolve_buckets
from datamodules.datamodule import FaceShardDataModule
from datamodules.loader import resolve_shards
from datamodules.schema import decode_sample, encode_sample
from datamodules.synthetic.dataset import SyntheticConfig, generate

BUCKETS = [[32, 32], [32, 64], [64, 32]]
# canvas (h, w) of sample i % 4 and the bucket it must get: log(w/h) 0, log 2, -log 2, log 1.75 (0.56: closer
# to log 2 = 0.69 than to 0)
CANVASES = [((64, 64), (32, 32)), ((64, 128), (32, 64)), ((128, 64), (64, 32)), ((64, 112), (32, 64))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """24 synthetic 64-px samples in 6 shards, each placed on a canvas of one of four aspect ratios."""
    out = tmp_path_factory.mktemp("buckets")
    m = generate(out / "syn", SyntheticConfig(size=64, identities=4, unseen=2, single=24, multi=0, heldout=0,
                                              samples_per_shard=4, seed=3, progress=False))
    expected: dict[str, dict] = {}
    (out / "aspect").mkdir()
    i = 0
    for url in resolve_shards(m["splits"]["single_train"]["path_pattern"]):
        with wds.TarWriter(str(out / "aspect" / Path(url).name)) as sink:
            for raw in wds.tarfile_to_samples()([{"url": url}]):
                s = decode_sample(raw)
                (h, w), bucket = CANVASES[i % len(CANVASES)]
                image = np.zeros((h, w, 3), np.uint8)
                image[:64, :64] = s.image
                masks = np.zeros((len(s.faces), h, w), np.uint8)
                masks[:, :64, :64] = s.masks
                sink.write(encode_sample(replace(s, image=image, masks=masks)))
                expected[s.key] = {"size": (h, w), "bucket": bucket}
                i += 1
    return {"pattern": str(out / "aspect"), "expected": expected}


def make_dm(pattern: str, **kw) -> FaceShardDataModule:
    args = dict(resolution=48, batch_size=4, num_workers=0, shuffle_buffer=8, seed=0, buckets=BUCKETS)
    args.update(kw)
    dm = FaceShardDataModule(pattern, **args)
    dm.setup("fit")
    return dm


def test_nearest_bucket_and_presets() -> None:
    sdxl = BUCKET_PRESETS["sdxl_1024"]
    assert resolve_buckets("sdxl_1024") == sdxl and len(sdxl) == 9 and (1024, 1024) in sdxl
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in sdxl)
    assert nearest_bucket(1000, 1000, sdxl) == (1024, 1024)
    assert nearest_bucket(600, 800, sdxl) == (896, 1152)  # 4:3 = 1.33: 1152/896 = 1.29 is closer than 1216/832 = 1.46
    assert nearest_bucket(720, 1280, sdxl) == (768, 1344)  # 16:9 = 1.78 vs 1.75
    assert nearest_bucket(3000, 1000, sdxl) == (1536, 640)  # 1:3, past the narrowest bucket
    assert resolve_buckets(None) is None and resolve_buckets([[32, 48]]) == ((32, 48),)
    with pytest.raises(ValueError, match="'sdxl_2048' is not a bucket preset"):
        resolve_buckets("sdxl_2048")
    with pytest.raises(ValueError, match=r"\[32, 0\] is not a bucket"):
        resolve_buckets([[32, 32], [32, 0]])


def test_batch_by_bucket_fills_per_bucket_and_flushes_the_rest() -> None:
    items = [{"image": np.zeros(shape), "key": str(i)} for i, shape in
             enumerate([(2, 2, 3), (2, 4, 3), (2, 2, 3), (2, 4, 3), (2, 2, 3), (4, 2, 3), (2, 4, 3)])]
    got = [[it["key"] for it in b] for b in batch_by_bucket(items, 2)]
    assert got == [["0", "2"], ["1", "3"], ["4"], ["6"], ["5"]]


def test_every_batch_is_one_bucket_the_closest_and_every_sample_comes_once(shards: dict) -> None:
    expected = shards["expected"]
    for workers in (0, 2):
        loader = make_dm(shards["pattern"], num_workers=workers).train_dataloader()
        for _epoch in range(2):
            keys = []
            for b in loader:
                n = len(b["key"])
                assert 1 <= n <= 4
                bucket = tuple(b["image"].shape[2:])
                assert b["face_masks"].shape == (n, 1, *bucket)
                assert b["original_size"].dtype == torch.long and b["original_size"].shape == (n, 2)
                assert b["crop_top_left"].dtype == torch.long and b["crop_top_left"].shape == (n, 2)
                for i, key in enumerate(b["key"]):
                    assert expected[key]["bucket"] == bucket, key
                    assert tuple(b["original_size"][i].tolist()) == expected[key]["size"]
                    assert b["face_masks"][i, 0].sum() > 0
                keys.extend(b["key"])
            assert sorted(keys) == sorted(expected)  # nothing lost, nothing duplicated


def test_eval_bucket_crops_have_hand_computed_size_conditioning(shards: dict) -> None:
    """Validation (eval crop, no shuffle): a 64 x 112 canvas in the 1:2 bucket (32, 64) is the widest 1:2 window
    112 x 56, centred at y0 = 4 unless the face forces it; (64, 128) is a plain resize: (0, 0)."""
    dm = make_dm(shards["pattern"], val_shards=shards["pattern"])
    seen = 0
    for b in dm.val_dataloader():
        for i, key in enumerate(b["key"]):
            size = shards["expected"][key]["size"]
            top, left = b["crop_top_left"][i].tolist()
            if size in ((64, 64), (64, 128), (128, 64)):  # the bucket's aspect: the whole image, resized
                assert (top, left) == (0, 0)
            else:  # 112 x 56 window: left 0, top in [0, 8] scaled by 32 / 56
                assert left == 0 and top in {round(y0 * 32 / 56) for y0 in range(9)}
            seen += 1
    assert seen == len(shards["expected"])


@pytest.mark.parametrize("buckets", [None, BUCKETS])
def test_resume_position_continues_the_interrupted_pass(shards: dict, buckets) -> None:
    """A loader resumed after k batches yields exactly the batches the uninterrupted pass yielded after k."""
    full = [b["key"] for b in make_dm(shards["pattern"], num_workers=2, buckets=buckets).train_dataloader()]
    for k in (1, 3):
        loader = make_dm(shards["pattern"], num_workers=2, buckets=buckets).train_dataloader()
        loader.load_state_dict({"epoch": 0, "batches": k})
        assert [b["key"] for b in loader] == full[k:]


def test_resampled_epoch_length_counts_bucketed_batches(shards: dict) -> None:
    dm = make_dm(shards["pattern"], resampled=True, epoch_length=5, num_workers=2, batch_size=3)
    loader = dm.train_dataloader()
    got = list(loader)
    assert len(got) == 5 == len(loader)
    assert all(len(b["key"]) == 3 for b in got)  # an endless stream: only full batches


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.keys: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.keys.extend(batch["key"])
        return self.lin(batch["image"].mean((2, 3))).pow(2).mean()  # (B, 3) -> scalar

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bucketed_batches_train_under_a_lightning_trainer(shards: dict) -> None:
    model = _Recorder()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=make_dm(shards["pattern"]))
    assert sorted(model.keys) == sorted(shards["expected"])
