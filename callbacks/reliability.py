"""Callbacks that make long runs resumable and observable.

- `ResumableRNG`: every training step starts from RNG states derived from (seed, rank, global step, batch
  count), so a resumed run draws exactly the noise, timesteps, dropout and Gumbel samples the interrupted
  run would have drawn, on every rank, whatever ran in between (data loading, validation, callbacks).
- `LossCSV`: appends `step,loss` per optimizer step to a CSV (flushed each row; survives SIGKILL).
- `RunHealthReport`: counts samples skipped as bad data (the loader's per-batch `skipped`) and steps
  skipped for a non-finite loss (the module's `nonfinite_total`), keeps the totals in checkpoints, and
  prints a summary when training ends or stops on an exception.
- `RunSettings`: keeps the settings a run was started with in every checkpoint it writes, so that a later
  run can tell whether a checkpoint it finds is its own (`src.cli.train` compares them before resuming).
"""
from __future__ import annotations

import csv
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)


def step_seed(seed: int, rank: int, global_step: int, batch_count: int) -> int:
    """A 63-bit seed that is a pure function of the training position (independent streams per rank)."""
    state = np.random.SeedSequence([seed, rank, global_step, batch_count, 0x5EED]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's and Python's global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ResumableRNG(L.Callback):
    """Reseed the global RNGs at the start of every training batch from the training position.

    Lightning restores the global step and the fit loop's batch counters from a checkpoint, so the RNG
    state of each step is restored with them: nothing else is needed in the checkpoint but `seed`
    (kept in this callback's state). Ranks get independent streams (the rank is part of the seed).

    seed: base seed (the run's `seed_everything` is a natural choice).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        batches = int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)
        seed_all(step_seed(self.seed, trainer.global_rank, trainer.global_step, batches))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))


class LossCSV(L.Callback):
    """Append `step,loss` (the optimizer step the batch produced, its training loss) to `path` on rank 0.

    Every row is flushed, so a run killed with SIGKILL keeps all rows written before the kill. Resumed runs
    append; a step written twice (after the last checkpoint, before a kill) appears twice, the later row
    being the resumed run's. Skipped (non-finite) steps write no row.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([trainer.global_step, repr(float(loss))])
            f.flush()


def read_loss_csv(path: str | Path) -> dict[int, float]:
    """{step: loss} of a LossCSV file; the last row of a step wins (the resumed run's)."""
    with Path(path).open(newline="") as f:
        return {int(step): float(loss) for step, loss in csv.reader(f)}


class RunHealthReport(L.Callback):
    """Totals of bad-data skips and non-finite steps, printed at the end of training (or on a crash).

    Totals are summed over ranks at the end of training and kept in checkpoints, so a resumed run reports
    the whole run. The module also logs `data/skipped` and `train/nonfinite_skipped` as metrics.
    """

    def __init__(self) -> None:
        self.skipped_samples = 0
        self.batches = 0
        self._restored_nonfinite = 0  # from a checkpoint (earlier part of the run)
        self._module_nonfinite = 0  # the module's count in this process, as of the last batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches += 1
        self._module_nonfinite = int(getattr(pl_module, "nonfinite_total", 0))
        if isinstance(batch, dict) and "skipped" in batch:
            self.skipped_samples += int(batch["skipped"].sum())

    def totals(self, trainer: L.Trainer, pl_module: L.LightningModule, reduce: bool) -> dict[str, int]:
        """{"skipped_samples", "batches", "nonfinite_steps"}; summed over ranks when `reduce`."""
        local = torch.tensor([self.skipped_samples, self.batches], dtype=torch.float64, device=pl_module.device)
        if reduce and trainer.world_size > 1:
            local = trainer.strategy.reduce(local, reduce_op="sum")
        nonfinite = self._restored_nonfinite + int(getattr(pl_module, "nonfinite_total", 0))
        return {"skipped_samples": int(local[0]), "batches": int(local[1]), "nonfinite_steps": nonfinite}

    def report(self, totals: dict[str, int], where: str) -> str:
        return (f"[run health] {where}: {totals['skipped_samples']} sample(s) skipped as bad data over "
                f"{totals['batches']} batch(es); {totals['nonfinite_steps']} step(s) skipped for a non-finite loss")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = self.totals(trainer, pl_module, reduce=True)
        if trainer.is_global_zero:
            print(self.report(totals, "end of training (all ranks)"), flush=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # no collective here: other ranks may not reach it
        print(self.report(self.totals(trainer, pl_module, reduce=False), f"stopped on rank {trainer.global_rank} "
                          f"({type(exception).__name__})"), flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_samples": self.skipped_samples, "batches": self.batches,
                "nonfinite_steps": self._restored_nonfinite + self._module_nonfinite}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_samples = int(state_dict.get("skipped_samples", 0))
        self.batches = int(state_dict.get("batches", 0))
        self._restored_nonfinite = int(state_dict.get("nonfinite_steps", 0))


RUN_SETTINGS_KEY = "run_settings"
NOT_SET = "<not set>"  # a setting one side has and the other lacks


class RunSettings(L.Callback):
    """Store the settings a run was started with in every checkpoint it writes.

    `settings` maps dotted keys ("model.lr", "data.batch_size", "seed_everything", ...) to plain values
    (strings, numbers, booleans, None, lists, dicts: checkpoints load with `weights_only=True`). They go to
    `checkpoint["run_settings"] = {"format": 1, "settings": {...}}`, the current run's settings also when it
    resumed from a checkpoint written with other ones. A checkpoint saved by a fast_dev_run, or while the run
    was still restoring another one (the on-exception checkpoint of a resume that failed before its first step:
    weights restored, optimizer not yet), stores `settings: None` and a `note`, so no later run resumes it as
    a match.
    `src.cli.train.UniPortraitCLI` attaches this callback to every `fit`; configs do not list it.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = dict(settings)
        self._training = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        note = None
        if trainer.fast_dev_run:
            note = "it was written by a fast_dev_run"
        elif not self._training and trainer.ckpt_path:
            note = f"it was written while restoring {trainer.ckpt_path}, before training started"
        if note:
            checkpoint[RUN_SETTINGS_KEY] = {"format": 1, "settings": None, "note": note}
        else:
            checkpoint[RUN_SETTINGS_KEY] = {"format": 1, "settings": dict(self.settings)}


def read_run_settings(path: str | Path) -> dict[str, Any] | None:
    """The `run_settings` entry of a checkpoint file (None if it has none); weights-only, memory-mapped load
    (the tensors are not read). An unreadable file raises ValueError naming `path`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001  (any failure: name the file)
        raise ValueError(f"cannot read checkpoint '{path}' (weights-only load): {str(e).splitlines()[0]}") from e
    entry = checkpoint.get(RUN_SETTINGS_KEY) if isinstance(checkpoint, dict) else None
    return entry if isinstance(entry, dict) else None


def same_value(a: Any, b: Any) -> bool:
    """Equal values, recursively; numbers by value (1 == 1.0), anything else only with the same type
    (True is not 1, "1" is not 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b
    return type(a) is type(b) and a == b


def settings_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, current value) for every key whose values differ; `NOT_SET` where one side lacks it."""
    return [(k, stored.get(k, NOT_SET), current.get(k, NOT_SET)) for k in sorted(set(stored) | set(current))
            if not same_value(stored.get(k, NOT_SET), current.get(k, NOT_SET))]
