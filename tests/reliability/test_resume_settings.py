"""Resuming is explicit or safe, through the real CLI: a run started without --ckpt_path resumes from the
checkpoint Lightning finds in its folder only when that checkpoint was written with the same settings; it
stops before training, naming the folder and each differing setting, otherwise. --ckpt_path always resumes;
fast_dev_run never resumes by itself and writes no checkpoint."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.reliability import RUN_SETTINGS_KEY, RunSettings
from src.cli.train import main
from src.resume import ResumeSettingsError
from tests.reliability.helpers import callbacks_arg, fit_args, plugins_arg

MC = "lightning.pytorch.callbacks.ModelCheckpoint"
ON_EXC = "lightning.pytorch.callbacks.OnExceptionCheckpoint"


def args(world: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    """Tiny stage-1 fit whose checkpoints (last.ckpt every step, on_exception.ckpt) go to `root/ckpt`."""
    ckpt = str(root / "ckpt")
    cbs = callbacks_arg((MC, {"dirpath": ckpt, "save_last": True, "every_n_train_steps": 1, "save_top_k": 0,
                              "enable_version_counter": False}),
                        (ON_EXC, {"dirpath": ckpt}), ("callbacks.reliability.ResumableRNG", {"seed": 0}))
    return [*fit_args(world, root), cbs, plugins_arg(), "--torch_threads=1", f"--trainer.max_steps={max_steps}",
            *extra]


@pytest.fixture(scope="module")
def leftover(tiny_world, tmp_path_factory) -> Path:
    """A finished 2-step run's checkpoint folder (last.ckpt at step 2), written with the tiny config's settings."""
    root = tmp_path_factory.mktemp("leftover")
    main(args(tiny_world, root, 2))
    return root / "ckpt"


def copy_of(leftover: Path, root: Path) -> Path:
    shutil.copytree(leftover, root / "ckpt")  # copy2: modification times kept (Lightning picks the newest)
    return root / "ckpt" / "last.ckpt"


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_checkpoints_store_the_run_settings(leftover):
    stored = torch.load(leftover / "last.ckpt", map_location="cpu", weights_only=True)[RUN_SETTINGS_KEY]
    settings = stored["settings"]
    assert settings["model.lr"] == 1e-3 and settings["seed_everything"] == 0
    assert settings["data.batch_size"] == 4 and settings["trainer.callbacks.ResumableRNG.seed"] == 0
    assert "trainer.max_steps" not in settings and "model.feature_cache" not in settings


def test_leftover_checkpoint_with_the_same_settings_resumes(leftover, tiny_world, tmp_path, caplog):
    last = copy_of(leftover, tmp_path)
    with caplog.at_level(logging.INFO, logger="src.resume"):
        cli = main(args(tiny_world, tmp_path, 3))  # max_steps is not a compared setting
    assert cli.trainer.global_step == 3 and step_of(last) == 3  # continued from step 2
    assert f"Resuming from {last}" in caplog.text and "same settings" in caplog.text


def test_leftover_checkpoint_with_other_settings_stops_naming_the_folder_and_the_setting(leftover, tiny_world,
                                                                                          tmp_path):
    last = copy_of(leftover, tmp_path)
    with pytest.raises(ResumeSettingsError) as err:
        main(args(tiny_world, tmp_path, 3, "--model.lr=5e-3"))
    message = str(err.value)
    assert str(last.parent) in message and "model.lr: 0.001 -> 0.005" in message
    assert f"--ckpt_path={last}" in message and "move or delete" in message
    assert step_of(last) == 2 and sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # nothing ran


def test_checkpoint_without_stored_settings_is_not_resumed(leftover, tiny_world, tmp_path):
    last = copy_of(leftover, tmp_path)
    old = torch.load(last, map_location="cpu", weights_only=True)
    del old[RUN_SETTINGS_KEY]  # as written before checkpoints recorded their settings
    torch.save(old, last)
    with pytest.raises(ResumeSettingsError, match=r"(?s)Not resuming from .*last\.ckpt.*holds no run settings"):
        main(args(tiny_world, tmp_path, 3))


def test_explicit_ckpt_path_resumes_even_when_settings_differ(leftover, tiny_world, tmp_path, caplog):
    last = copy_of(leftover, tmp_path)
    with caplog.at_level(logging.INFO, logger="src.resume"):
        cli = main(args(tiny_world, tmp_path, 3, "--model.lr=5e-3", "--data.shuffle_buffer=8", f"--ckpt_path={last}",
                        "--model.gradient_checkpointing=true", "--model.max_nonfinite_steps=3"))
    assert cli.trainer.global_step == 3
    # LightningCLI builds the model from the checkpoint's hyperparameters: the given lr is replaced, and said so
    assert "model.lr: 0.005 (given) -> 0.001 (checkpoint)" in caplog.text
    # options that leave the trajectory alone hold as given (a smaller GPU resuming with checkpointing on)
    assert cli.model.hparams.gradient_checkpointing is True and cli.model.hparams.max_nonfinite_steps == 3
    assert "gradient_checkpointing" not in caplog.text
    assert "data.shuffle_buffer: 16 -> 8" in caplog.text


def test_fast_dev_run_does_not_resume_and_leaves_no_checkpoint(leftover, tiny_world, tmp_path):
    last = copy_of(leftover, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in last.parent.iterdir()}
    cli = main(args(tiny_world, tmp_path, 600, "--trainer.fast_dev_run=true"))
    assert cli.trainer.global_step == 1  # a fresh one-batch run, not the leftover's step 2 + 1
    assert {p.name: p.stat().st_mtime_ns for p in last.parent.iterdir()} == before  # last.ckpt untouched


def test_checkpoints_of_a_fast_dev_run_or_of_a_failed_restore_hold_no_settings():
    """An on-exception checkpoint written while a resume was still restoring (weights back, optimizer not yet)
    or any checkpoint of a fast_dev_run must never count as a match."""
    cb = RunSettings({"model.lr": 1e-3})
    saved: dict = {}
    cb.on_save_checkpoint(SimpleNamespace(fast_dev_run=False, ckpt_path="old/last.ckpt"), None, saved)
    assert saved[RUN_SETTINGS_KEY]["settings"] is None and "old/last.ckpt" in saved[RUN_SETTINGS_KEY]["note"]
    cb.on_save_checkpoint(SimpleNamespace(fast_dev_run=True, ckpt_path=None), None, saved)
    assert saved[RUN_SETTINGS_KEY]["settings"] is None and "fast_dev_run" in saved[RUN_SETTINGS_KEY]["note"]
    cb.on_train_start(None, None)
    cb.on_save_checkpoint(SimpleNamespace(fast_dev_run=False, ckpt_path="old/last.ckpt"), None, saved)
    assert saved[RUN_SETTINGS_KEY] == {"format": 1, "settings": {"model.lr": 1e-3}}
