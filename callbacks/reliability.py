"""Callbacks that make long runs resumable and observable.

- `ResumableRNG`: every training step starts from RNG states derived from (seed, rank, global step, batch
  count), so a resumed run draws exactly the noise, timesteps, dropout and Gumbel samples the interrupted
  run would have drawn, on every rank, whatever ran in between (data loading, validation, callbacks).
- `LossCSV`: appends `step,loss` per optimizer step to a CSV (flushed each row; survives SIGKILL).
- `RunHealthReport`: counts samples skipped as bad data (the loader's per-batch `skipped`) and steps
  skipped for a non-finite loss (the module's `nonfinite_total`), keeps the totals in checkpoints, and
  prints a summary when training ends or stops on an exception.
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

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
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
