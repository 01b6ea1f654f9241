"""Numerical faults, a run over partly corrupt shards, and bad configs/inputs, through the real CLI."""
from __future__ import annotations

import pytest
import torch
import yaml

from src.cli.train import main
from src.module import NonFiniteLossError
from tests.reliability.helpers import CONFIGS, callbacks_arg, fit_args
from tests.reliability.test_bad_data import CASES, raw_samples, write_shard

HEALTH = ("callbacks.reliability.RunHealthReport", {})


def test_nonfinite_steps_are_skipped_counted_and_reported(tiny_world, tmp_path, capsys):
    poison = ("tests.reliability.helpers.PoisonBatches", {"start": 1, "count": 2})
    cli = main([*fit_args(tiny_world, tmp_path), callbacks_arg(poison, HEALTH), "--trainer.max_steps=4",
                "--trainer.enable_checkpointing=false", "--model.max_nonfinite_steps=3"])
    assert cli.model.nonfinite_total == 2 and cli.model.nonfinite_in_a_row == 0
    # Lightning 2.6.6 still counts a skipped step (optimizer called without gradients) in global_step
    assert cli.trainer.global_step == 4  # the run went on after the skipped steps
    opt_steps = {float(s["step"]) for s in cli.trainer.optimizers[0].state.values()}
    assert opt_steps == {2.0}  # ... but AdamW only stepped on the 2 finite batches
    assert "2 step(s) skipped for a non-finite loss" in capsys.readouterr().out


def test_too_many_nonfinite_steps_stop_with_a_clear_message_and_a_checkpoint(tiny_world, tmp_path):
    poison = ("tests.reliability.helpers.PoisonBatches", {"start": 1, "count": 100})
    on_exc = ("lightning.pytorch.callbacks.OnExceptionCheckpoint", {"dirpath": str(tmp_path / "ckpt")})
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row.*model.max_nonfinite_steps=3"):
        main([*fit_args(tiny_world, tmp_path), callbacks_arg(poison, HEALTH, on_exc), "--trainer.max_steps=10",
              "--model.max_nonfinite_steps=3",
              '--trainer.plugins=[{"class_path": "src.checkpoint_io.AtomicCheckpointIO"}]'])
    ckpt = torch.load(tmp_path / "ckpt" / "on_exception.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["uniportrait"]["stage"] == 1  # 1 good step + 2 skipped
    assert {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()} == {1.0}
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())  # skipped steps did not corrupt


def test_a_run_over_shards_with_5_percent_corrupt_samples_completes_and_reports(tiny_world, tmp_path, capsys):
    kinds = sorted(CASES)
    for i in range(2):  # 2 shards x 20 samples, 1 corrupt in each: 2 of 40 = 5 %
        good = raw_samples(tiny_world, f"single/train-00000{i}.tar", n=19)
        corrupt, _, _ = CASES[kinds[i]]
        write_shard(tmp_path / f"bad-00000{i}.tar", [*good[:7], corrupt(dict(good[7], __key__=f"bad{i}")), *good[7:]])
    cli = main([*fit_args(tiny_world, tmp_path), callbacks_arg(HEALTH), "--trainer.enable_checkpointing=false",
                f"--data.train_shards={tmp_path}/bad-{{000000..000001}}.tar", "--data.resampled=false",
                "--data.epoch_length=null", "--trainer.max_steps=-1", "--trainer.max_epochs=1"])
    assert cli.trainer.global_step == 10  # ceil(38 good samples / batch 4)
    assert "2 sample(s) skipped as bad data over 10 batch(es)" in capsys.readouterr().out


def test_unknown_callback_argument_and_bad_data_key_are_named(tiny_world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*fit_args(tiny_world, tmp_path), callbacks_arg(("callbacks.reliability.ResumableRNG", {"sed": 1}))],
             run=False)
    assert "sed" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"inherits": str(CONFIGS / "tiny" / "stage1.yaml"), "data": {"batchsize": 4}}))
    with pytest.raises(SystemExit):
        main(["fit", f"--config={bad}", *fit_args(tiny_world, tmp_path)[2:]], run=False)
    assert "batchsize" in capsys.readouterr().err


def test_missing_init_from_is_named_before_training(tiny_world, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.init_from.*nope.ckpt"):
        main([*fit_args(tiny_world, tmp_path), f"--model.init_from={tmp_path / 'nope.ckpt'}"], run=False)


def test_resume_from_a_checkpoint_of_the_wrong_layout_is_named(tiny_world, tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"foo": torch.zeros(1)}, "global_step": 3, "pytorch-lightning_version": "2.6.6",
                "loops": {}}, path)
    with pytest.raises(ValueError, match="not a UniPortrait checkpoint"):
        main([*fit_args(tiny_world, tmp_path), "--trainer.max_steps=1", "--trainer.callbacks=[]",
              "--trainer.enable_checkpointing=false", f"--ckpt_path={path}"])
