"""Multi-process: Lightning DDP on 2 CPU processes (gloo) equals one process with the matching global batch.

Design of the comparison: with every source of randomness made a function of (sample key, step)
(`KeyedNoise`: per-sample noise and timestep, argmax routing; no random crop, no face/condition dropout,
no DropToken/DropPath, no other-image references), a sample's loss no longer depends on its rank. The
single process then trains on batches built by concatenating what rank 0 and rank 1 load at each step
(the same FaceShardDataset streams, constructed with rank 0/1 of world 2): DDP's gradient average over
2 x B equals the single process's mean over 2B, so the weights agree up to float summation order.

Both runs are in float64 (`64-true`). In float32 the summation-order noise is ~1e-7 of a gradient, and
AdamW's first steps (update ~ lr * g / (|g| + eps)) turn that into an absolute weight difference of a
visible fraction of lr wherever a gradient element is near eps (seen: one router weight 6e-5 apart after
3 steps at lr 3e-3). In float64 the two runs agree to ~1e-14, so the tolerance below can be tight.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from datamodules.datamodule import FaceShardDataModule
from src.cli.train import main
from tests.reliability.helpers import callbacks_arg, fit_args, run_cli

DETERMINISTIC = ["--data.resampled=false", "--data.epoch_length=null", "--data.random_crop=false",
                 "--data.p_other_reference=0", "--data.batch_size=2", "--model.p_drop_face=0",
                 "--model.qformer.p_drop_path=0", "--model.qformer.p_drop_token=0", "--trainer.precision=64-true"]
STEPS = 3


class FixedRank(FaceShardDataModule):
    def __init__(self, rank: int, **kw) -> None:
        super().__init__(**kw)
        self._rank = rank

    def rank_and_world(self) -> tuple[int, int]:
        return self._rank, 2


class BatchList:
    """A fixed sequence of batches as one train iterable (a plain list would be read as many loaders)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


FACE_FIELDS = ("face_recog", "face_clip", "face_masks", "face_valid", "face_digest", "identity", "reference_key")


def pad_faces(value, key: str, n: int):
    """Pad a batch field's face-slot dimension (dim 1, or the inner lists) to `n` slots (zeros / None)."""
    if key not in FACE_FIELDS:
        return value
    if torch.is_tensor(value):
        pad = value.new_zeros(value.shape[0], n - value.shape[1], *value.shape[2:])
        return torch.cat([value, pad], dim=1)
    return [list(row) + [None] * (n - len(row)) for row in value]


def global_batches(dm_kwargs: dict, steps: int) -> list[dict]:
    """Per step, rank 0's and rank 1's batches concatenated (what DDP trains on at that step)."""
    loaders = []
    for rank in (0, 1):
        dm = FixedRank(rank, **dm_kwargs)
        dm.setup("fit")
        loaders.append(iter(dm.train_dataloader()))
    out = []
    for _ in range(steps):
        a, b = next(loaders[0]), next(loaders[1])
        n = max(a["face_valid"].shape[1], b["face_valid"].shape[1])  # pad face slots to the larger Nmax
        out.append({k: torch.cat([pad_faces(a[k], k, n), pad_faces(b[k], k, n)]) if torch.is_tensor(a[k])
                    else pad_faces(a[k], k, n) + pad_faces(b[k], k, n) for k in a})
    return out


def ddp_vs_single(world: Path, tmp_path: Path, multi: bool, extra: list[str]) -> None:
    config = "stage2.yaml" if multi else "stage1.yaml"
    base = [*fit_args(world, tmp_path / "ddp", multi=multi, config=config), *DETERMINISTIC, *extra]
    cbs = callbacks_arg(("tests.reliability.helpers.KeyedNoise", {}),
                        ("tests.reliability.helpers.KeyLog", {"dir": str(tmp_path / "keys")}),
                        ("lightning.pytorch.callbacks.ModelCheckpoint",
                         {"dirpath": str(tmp_path / "ddp_ckpt"), "save_last": True, "every_n_train_steps": STEPS}))
    done = run_cli([*base, cbs, f"--trainer.max_steps={STEPS}", "--trainer.strategy=ddp", "--trainer.devices=2",
                    "--trainer.accelerator=cpu"], timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    ddp = torch.load(tmp_path / "ddp_ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ddp["global_step"] == STEPS

    # ranks saw disjoint samples, and the shards were split between them
    seen = {r: [json.loads(line) for line in (tmp_path / "keys" / f"keys-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    keys = {r: [k for row in rows for k in row["keys"]] for r, rows in seen.items()}
    assert len(keys[0]) == len(keys[1]) == 2 * STEPS and not set(keys[0]) & set(keys[1])

    # one process, same config, global batch = rank 0's + rank 1's batch of each step
    cli = main([*fit_args(world, tmp_path / "single", multi=multi, config=config), *DETERMINISTIC, *extra,
                callbacks_arg(("tests.reliability.helpers.KeyedNoise", {})), f"--trainer.max_steps={STEPS}",
                "--trainer.enable_checkpointing=false"], run=False)
    init = {k: v.clone() for k, v in cli.model.adapter_state_dict().items()}
    dm = cli.datamodule
    batches = global_batches(dict(train_shards=dm.train_shards, multi_id=dm.multi_id, max_faces=dm.max_faces,
                                  resolution=dm.resolution, batch_size=dm.batch_size, num_workers=0,
                                  shuffle_buffer=dm.shuffle_buffer, seed=dm.seed, p_other_reference=0.0,
                                  random_crop=False), STEPS)
    assert [b["key"] for b in batches] == [seen[0][s]["keys"] + seen[1][s]["keys"] for s in range(STEPS)]
    cli.trainer.fit(cli.model, train_dataloaders=BatchList(batches))
    single = cli.model.adapter_state_dict()
    moved = max(float((single[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3  # training changed the weights far beyond the tolerance below
    for k, v in single.items():
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-9, atol=1e-10, msg=k)


@pytest.mark.slow
def test_ddp_two_cpu_processes_stage1_equals_single_process(tiny_world, tmp_path):
    ddp_vs_single(tiny_world, tmp_path, multi=False, extra=[])


@pytest.mark.slow
def test_ddp_two_cpu_processes_stage2_equals_single_process(tiny_world, tmp_path):
    ddp_vs_single(tiny_world, tmp_path, multi=True, extra=["--model.init_from=null"])


@pytest.mark.slow
def test_ddp_stage_switch_keeps_the_replicas_in_step_and_validates_on_one_shard(tiny_world, tmp_path):
    """StageSwitch in a 2-process DDP run: the routers and multi-ID LoRA created at the switch must be
    registered with DDP (their gradients averaged) and start from rank 0's values, so both ranks end with the
    same weights. Created after DDP wrapped the module, they would train apart on each rank's own data (the
    routers' random init already differs: each rank has its own seed).

    Validation reads one shard: both ranks take part (split by sample) and log the same all-rank means. Split
    by shard, rank 1 had no batch and the run hung at the first validation's metric sync. The routing maps are
    measured on rank 0 alone, at step 3: its metric must not gather from the other rank."""
    multi = str(tiny_world / "data" / "multi" / "train-{000000..000003}.tar")
    heldout = tiny_world / "data" / "heldout" / "multi_seen-000000.tar"
    cbs = callbacks_arg(("callbacks.stage_switch.StageSwitch", {"at_step": 2, "multi_id_shards": multi}),
                        ("callbacks.reliability.ResumableRNG", {"seed": 0}),
                        ("tests.reliability.helpers.KeyLog", {"dir": str(tmp_path / "keys")}),
                        ("tests.reliability.helpers.RankAdapters", {"dir": str(tmp_path / "ranks")}),
                        ("callbacks.routing_maps.RoutingMapLogger", {"every_n_steps": 3, "num_images": 2}))
    done = run_cli([*fit_args(tiny_world, tmp_path / "ddp"), cbs, "--data.epoch_length=2", "--data.batch_size=2",
                    "--trainer.max_steps=4", "--trainer.enable_checkpointing=false", "--trainer.strategy=ddp",
                    "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.check_val_every_n_epoch=1",
                    "--trainer.limit_val_batches=2", f"--data.val_shards={heldout}"], timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "now stage 2" in done.stdout
    rows = {r: [json.loads(line) for line in (tmp_path / "keys" / f"keys-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    assert [row["step"] for row in rows[0]] == [row["step"] for row in rows[1]] == [0, 1, 2, 3]
    assert [row["keys"] for row in rows[0]] != [row["keys"] for row in rows[1]]  # the ranks' batches differ
    r0, r1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["stage"] == r1["stage"] == 2
    routed = [k for k in r0["state"] if "router" in k or "multi_id" in k]
    assert routed and set(r0["state"]) == set(r1["state"])
    for k, v in r0["state"].items():
        assert torch.equal(r1["state"][k], v), f"{k} differs between the DDP ranks"
    assert "routing/acc_all" in r0["metrics"] and "routing/acc_all" not in r1["metrics"]
    for k in ("val/loss_own_id", "val/loss_other_id"):
        assert r0["metrics"][k] == r1["metrics"][k] and math.isfinite(r0["metrics"][k]), k
