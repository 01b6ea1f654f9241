"""Kill and resume: a CLI run killed with SIGKILL mid-training resumes from last.ckpt at the right step,
with optimizer, RNG and data position restored: its loss curve equals an uninterrupted run's."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from callbacks.reliability import read_loss_csv
from tests.reliability.helpers import callbacks_arg, fit_args, plugins_arg, run_cli, start_cli, wait_for

MC = "lightning.pytorch.callbacks.ModelCheckpoint"


SCHEDULES = ['--model.lr_scheduler={"class_path": "src.schedules.WarmupCosine", "init_args": {"total_steps": 5, '
             '"warmup_steps": 1}}', "--model.gumbel_tau_end=0.3", "--model.gumbel_tau_steps=4"]


def run_args(world: Path, root: Path, max_steps: int, extra_callbacks=(), multi_switch: bool = False,
             extra: tuple[str, ...] = ()) -> list[str]:
    cbs = [(MC, {"dirpath": str(root / "ckpt"), "save_last": True, "every_n_train_steps": 1}),
           ("callbacks.reliability.ResumableRNG", {"seed": 0}),
           ("callbacks.reliability.LossCSV", {"path": str(root / "loss.csv")}), *extra_callbacks]
    if multi_switch:
        cbs.append(("callbacks.stage_switch.StageSwitch",
                    {"at_step": 4, "multi_id_shards": str(world / "data" / "multi" / "train-{000000..000003}.tar")}))
    return [*fit_args(world, root), callbacks_arg(*cbs), plugins_arg(), f"--trainer.max_steps={max_steps}",
            "--data.epoch_length=5" if not multi_switch else "--data.epoch_length=4", *extra]


def kill_at(world: Path, root: Path, step: int, max_steps: int, **kw) -> None:
    """Start a run that parks after `step` (checkpoint written), then SIGKILL it."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "parked"
    park = ("tests.reliability.helpers.ParkAtStep", {"step": step, "marker": str(marker)})
    proc = start_cli(run_args(world, root, max_steps, [park], **kw), root / "killed.log")
    try:
        wait_for(marker, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def check_resume(world: Path, tmp_path: Path, kill_step: int, max_steps: int, **kw) -> tuple[Path, Path]:
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_cli(run_args(world, ref, max_steps, **kw))
    assert done.returncode == 0, done.stderr[-3000:]
    kill_at(world, run, kill_step, max_steps, **kw)
    last = run / "ckpt" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == kill_step
    before = read_loss_csv(run / "loss.csv")
    assert max(before) == kill_step  # the killed run trained up to the kill point, no further
    resumed = run_cli([*run_args(world, run, max_steps, **kw), f"--ckpt_path={last}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (run / "loss.csv").read_text().splitlines()
    assert rows[kill_step].split(",")[0] == str(kill_step + 1)  # the resumed run's first step

    want, got = read_loss_csv(ref / "loss.csv"), read_loss_csv(run / "loss.csv")
    assert sorted(got) == sorted(want) == list(range(1, max_steps + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), f"loss differs at step {step}"
    # the final weights and optimizer moments agree too (a fresh optimizer after resume would not)
    a = torch.load(ref / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == max_steps
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-7, msg=k)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert float(sa["step"]) == float(sb["step"])
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    assert b["lr_schedulers"] == a["lr_schedulers"]
    assert [g["lr"] for g in b["optimizer_states"][0]["param_groups"]] == \
        [g["lr"] for g in a["optimizer_states"][0]["param_groups"]]
    return ref, run


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tiny_world, tmp_path):
    """Killed at step 7 (epoch 1, batch 3 of 5): the resumed run continues at step 8 with the batches,
    noise and optimizer state the uninterrupted run used (loss per step equal to 1e-5)."""
    check_resume(tiny_world, tmp_path, kill_step=7, max_steps=11)


@pytest.mark.slow
def test_sigkill_after_the_stage_switch_then_resume_matches(tiny_world, tmp_path):
    """StageSwitch at the end of epoch 0 (step 4); killed at step 6 (stage 2, mid-epoch): the resumed run
    is in stage 2 on multi-ID data and its losses equal the uninterrupted run's. With a warm-up/cosine LR
    schedule and an annealed Gumbel temperature, both rebuilt at the switch: their positions resume too."""
    _, run = check_resume(tiny_world, tmp_path, kill_step=6, max_steps=9, multi_switch=True, extra=tuple(SCHEDULES))
    last = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    assert last["uniportrait"]["stage"] == 2 and last["uniportrait"]["stage_start_step"] == 4
    assert last["lr_schedulers"][0]["last_epoch"] == 9 - 4  # stepped once per stage-2 optimizer step


@pytest.mark.slow
def test_sigkill_at_the_stage_switch_boundary_then_resume_matches(tiny_world, tmp_path):
    """Killed right after step 4, the last batch of stage 1, whose checkpoint is written before the switch
    at the epoch end: the resumed run must still switch before step 5."""
    check_resume(tiny_world, tmp_path, kill_step=4, max_steps=7, multi_switch=True)
