"""IdentityMetrics in a short fit (stage 1 and stage 2), that it scores each image against its own sample's
references (single- and multi-ID), and the module's sample_images contract."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from src.cli.train import main as train_main
from tests.helpers import SMALL_MODEL, tiny_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MULTI = "val_id/multi/"
# MultiIdentityMetrics keys defined for any scored image (sim_matched / leakage are nan, so not logged,
# when no face / no unmatched pair was found), and the keys whose values are rates or scores in [0, 1]
MULTI_ALWAYS = {"sim_mht", "id_conf", "count_acc", "duplicate_rate", "face_sim", "no_face_rate", "num_images"}
MULTI_UNIT = {"id_conf", "count_acc", "duplicate_rate", "face_sim", "no_face_rate"}


def multi_values(last: dict[str, float]) -> dict[str, float]:
    """The val_id/multi/<key> figures of a measure() result, by key."""
    return {k[len(MULTI):]: v for k, v in last.items() if k.startswith(MULTI)}


def assert_multi_in_range(values: dict[str, float], num_images: int) -> None:
    assert MULTI_ALWAYS <= set(values) <= MULTI_ALWAYS | {"sim_matched", "leakage"}
    assert all(math.isfinite(v) for v in values.values()), values
    assert values["num_images"] == num_images
    assert all(0.0 <= values[k] <= 1.0 for k in MULTI_UNIT), values
    assert all(-1.0 <= values[k] <= 1.0 for k in ("sim_matched", "sim_mht", "leakage") if k in values), values


def fit_with_metrics(world: Path, out: Path, stage: int, steps: int, extra: list[str] = ()):
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(out / "ckpt"), "save_last": True, "every_n_train_steps": steps}},
        {"class_path": "callbacks.id_metrics.IdentityMetrics",
         "init_args": {"every_n_steps": 2, "num_images": 2, "num_inference_steps": 2, "calibration_renders": 2}},
    ]
    torch.manual_seed(0)
    return train_main(["fit", f"--config={CONFIGS / 'tiny' / f'stage{stage}.yaml'}",
                       *tiny_args(world, multi=stage == 2), *SMALL_MODEL, f"--trainer.default_root_dir={out}",
                       f"--trainer.max_steps={steps}", f"--trainer.callbacks={json.dumps(callbacks)}",
                       '--trainer.logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger", '
                       f'"init_args": {{"save_dir": "{out}", "name": "tb"}}}}', *extra])


def logged_tags(out: Path, kind: str = "scalars") -> set[str]:
    """The TensorBoard tags of `kind` ("scalars", "images", ...) in every event file under `out`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in out.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()[kind])
    return tags


@pytest.mark.slow
def test_callback_logs_face_sim_and_clip_i_in_stage1_and_routing_in_stage2(tiny_world, tmp_path):
    cli = fit_with_metrics(tiny_world, tmp_path / "s1", 1, 2)
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == "IdentityMetrics")
    assert {"val_id/face_sim", "val_id/no_face_rate", "val_id/clip_i_own_tower"} <= set(cb.last)
    assert 0.0 <= cb.last["val_id/face_sim"] <= 1.0
    assert "val_id/routing_acc" not in cb.last  # stage 1: no routers
    tags1 = logged_tags(tmp_path / "s1")
    assert {"val_id/face_sim", "val_id/clip_i_own_tower"} <= tags1
    assert not multi_values(cb.last) and not any(t.startswith(MULTI) for t in tags1)  # single-ID batch

    last = tmp_path / "s1" / "ckpt" / "last.ckpt"
    cli2 = fit_with_metrics(tiny_world, tmp_path / "s2", 2, 2, [f"--model.init_from={last}"])
    cb2 = next(c for c in cli2.trainer.callbacks if type(c).__name__ == "IdentityMetrics")
    acc = cb2.last["val_id/routing_acc"]
    assert acc != acc or 0.0 <= acc <= 1.0  # NaN only when no face position was counted
    tags2 = logged_tags(tmp_path / "s2")
    assert "val_id/routing_acc" in tags2
    assert "val_id/face_count_ok" in cb2.last  # multi-face validation samples
    assert_multi_in_range(multi_values(cb2.last), num_images=2)  # both samples of the fixed subset
    assert {MULTI + k for k in multi_values(cb2.last)} <= tags2


def test_sample_images_contract(tiny_world):
    """(B, 3, H, W) in [-1, 1], reproducible for a seed, and the module's mode / LoRA are restored."""
    from datamodules.datamodule import FaceShardDataModule
    from src.models import adapters
    from src.models.id_embedding import QFormerSpec
    from src.module import UniPortraitModule
    from src.tiny import tiny_components

    torch.manual_seed(0)
    module = UniPortraitModule(tiny_components(tiny_world), lora_rank=4,
                               qformer=QFormerSpec(depth=1, num_queries=16, width=64, heads=4, dim_head=16))
    dm = FaceShardDataModule(train_shards=str(tiny_world / "data/heldout/single_seen-000000.tar"),
                             val_shards=str(tiny_world / "data/heldout/single_seen-000000.tar"), resolution=64,
                             batch_size=2, num_workers=0, shuffle_buffer=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    module.train()
    a = module.sample_images(batch, num_inference_steps=2, seed=3)["images"]
    b = module.sample_images(batch, num_inference_steps=2, seed=3)["images"]
    c = module.sample_images(batch, num_inference_steps=2, seed=4)["images"]
    assert a.shape == (2, 3, 64, 64) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert module.training and module.identity.embedding.training
    assert adapters.lora_names(module.unet) == ["single_id"]


def test_face_sim_scores_each_image_against_its_own_references(tiny_world, monkeypatch):
    """measure() scores each sample's image against that sample's own reference crops: "generations" that
    show each sample's own person (its real image) score a higher Face Sim and CLIP-I than the same images
    handed to the wrong samples (rolled by one, so every image shows another person)."""
    from callbacks.id_metrics import IdentityMetrics
    from datamodules.datamodule import FaceShardDataModule
    from src.models.id_embedding import QFormerSpec
    from src.module import UniPortraitModule
    from src.tiny import tiny_components

    torch.manual_seed(0)
    module = UniPortraitModule(tiny_components(tiny_world), lora_rank=4,
                               qformer=QFormerSpec(depth=1, num_queries=16, width=64, heads=4, dim_head=16))
    shard = str(tiny_world / "data/heldout/single_seen-000000.tar")
    dm = FaceShardDataModule(train_shards=shard, val_shards=shard, resolution=64, batch_size=4, num_workers=0,
                             shuffle_buffer=0)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    people = [names[0] for names in batch["identity"]]
    assert all(a != b for a, b in zip(people, people[1:] + people[:1]))  # rolling by one changes every person
    cb = IdentityMetrics(num_images=4, num_inference_steps=2, calibration_renders=2)

    def measure_with(images: torch.Tensor) -> dict[str, float]:
        monkeypatch.setattr(module, "sample_images", lambda *a, **k: {"images": images})
        return cb.measure(module, batch)

    own = measure_with(batch["image"])
    wrong = measure_with(batch["image"].roll(1, dims=0))
    assert own["val_id/no_face_rate"] < 1.0  # faces were found, so Face Sim compared embeddings
    assert own["val_id/face_sim"] > wrong["val_id/face_sim"]
    assert own["val_id/clip_i_own_tower"] > wrong["val_id/clip_i_own_tower"]
    assert not multi_values(own)  # a single-ID batch: no multi-person metrics
    assert own["val_id/unscored_images"] == 0

    # a reference the recogniser finds no face in: that image is left out and counted, not scored on the rest
    embed = cb.reference_embedding
    first = batch["face_recog"][0, 0].data_ptr()
    monkeypatch.setattr(cb, "reference_embedding",
                        lambda rec, crop: None if crop.data_ptr() == first else embed(rec, crop))
    one_lost = measure_with(batch["image"])
    assert one_lost["val_id/unscored_images"] == 1 and "val_id/face_sim" in one_lost
    monkeypatch.setattr(cb, "reference_embedding", lambda rec, crop: None)
    all_lost = measure_with(batch["image"])
    assert all_lost["val_id/unscored_images"] == 4 and "val_id/face_sim" not in all_lost


def test_multi_id_metrics_score_each_image_against_its_own_references(tiny_world, monkeypatch):
    """On a multi-ID batch measure() adds MultiIdentityMetrics from the same detections as Face Sim: with
    each sample's own multi-person image as its "generation", the Hungarian-matched similarity beats the
    same images handed to other samples (sharing no person with them); every sample having >= 2
    references, the multi-ID greedy Face Sim is FaceSimilarity's Face Sim."""
    from callbacks.id_metrics import IdentityMetrics
    from datamodules.datamodule import FaceShardDataModule
    from src.models.id_embedding import QFormerSpec
    from src.module import UniPortraitModule
    from src.tiny import tiny_components

    torch.manual_seed(0)
    module = UniPortraitModule(tiny_components(tiny_world), lora_rank=4,
                               qformer=QFormerSpec(depth=1, num_queries=16, width=64, heads=4, dim_head=16))
    shard = str(tiny_world / "data/heldout/multi_seen-000000.tar")
    dm = FaceShardDataModule(train_shards=shard, val_shards=shard, resolution=64, batch_size=4, num_workers=0,
                             shuffle_buffer=0, multi_id=True)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert (batch["face_valid"].sum(1) >= 2).all()
    people = [{n for n in names if n is not None} for names in batch["identity"]]  # None: an empty slot
    # images handed to other samples that share no person with them
    shuffle = next(list(p) for p in itertools.permutations(range(4)) if all(not people[i] & people[j]
                                                                            for i, j in enumerate(p)))
    cb = IdentityMetrics(num_images=4, num_inference_steps=2, calibration_renders=2)

    def measure_with(images: torch.Tensor) -> dict[str, float]:
        monkeypatch.setattr(module, "sample_images", lambda *a, **k: {"images": images})
        return cb.measure(module, batch)

    own = measure_with(batch["image"])
    wrong = measure_with(batch["image"][shuffle])
    mine, theirs = multi_values(own), multi_values(wrong)
    assert_multi_in_range(mine, num_images=4)
    assert_multi_in_range(theirs, num_images=4)
    assert mine["no_face_rate"] < 1.0 and "sim_matched" in mine and "sim_matched" in theirs
    assert mine["sim_matched"] > theirs["sim_matched"]
    assert mine["sim_mht"] > theirs["sim_mht"]
    assert math.isclose(mine["face_sim"], own["val_id/face_sim"], abs_tol=1e-5)
    assert math.isclose(theirs["face_sim"], wrong["val_id/face_sim"], abs_tol=1e-5)
