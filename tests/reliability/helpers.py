"""Test-only helpers for tests/reliability: CLI argument builders, a subprocess runner, and callbacks that
inject faults or remove randomness (importable by the CLI as `tests.reliability.helpers.<Name>`)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tests.helpers import SMALL_MODEL, tiny_args

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def callbacks_arg(*specs: tuple[str, dict[str, Any]]) -> str:
    """`--trainer.callbacks=[...]` from (class_path, init_args) pairs."""
    return "--trainer.callbacks=" + json.dumps([{"class_path": c, "init_args": a} for c, a in specs])


def plugins_arg() -> str:
    return '--trainer.plugins=[{"class_path": "src.checkpoint_io.AtomicCheckpointIO"}]'


def fit_args(world: Path, root: Path, multi: bool = False, config: str = "stage1.yaml") -> list[str]:
    """`fit` on the tiny config, small model, no logger, everything written under `root`."""
    return ["fit", f"--config={CONFIGS / 'tiny' / config}", *tiny_args(world, multi=multi), *SMALL_MODEL,
            f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--seed_everything=0"]


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m src.train <args>` in a subprocess (repository root, one thread); output captured."""
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=REPO, env=cli_env(), text=True,
                          capture_output=True, timeout=timeout)


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "src.train", *args], cwd=REPO, env=cli_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until `path` exists (fail if `proc` exits first)."""
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


class ParkAtStep(L.Callback):
    """At the start of the batch after optimizer step `step` (its checkpoint written), create `marker` and
    sleep, so a test can SIGKILL the process at a known training position."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(self.step))
            time.sleep(self.seconds)


class PoisonBatches(L.Callback):
    """Set the images of the batches at global steps [start, start + count) to NaN (non-finite loss)."""

    def __init__(self, start: int, count: int) -> None:
        self.start, self.count = start, count
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start <= trainer.global_step and self.seen < self.count:
            batch["image"].fill_(float("nan"))
            self.seen += 1


def key_seed(key: str, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}|{step}".encode()).digest()[:8], "little") & (2**63 - 1)


class KeyedNoise(L.Callback):
    """Make each sample's diffusion noise and timestep a function of (sample key, global step) only, and
    route by argmax (no Gumbel noise): the loss of a sample no longer depends on which rank or which batch
    position it is in, so 2 ranks x B and 1 process x 2B can be compared exactly. Test-only: it replaces
    the module instance's `_sample_noise` / `_context` (not a public API)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        keys, step = list(batch["key"]), trainer.global_step
        cls = type(pl_module)

        def sample_noise(latents: torch.Tensor, generator: torch.Generator | None = None):
            if generator is not None:
                return cls._sample_noise(pl_module, latents, generator)
            noise, t = [], []
            for k in keys:
                g = torch.Generator().manual_seed(key_seed(k, step))
                noise.append(torch.randn(latents.shape[1:], generator=g))  # (4, h, w)
                t.append(torch.randint(0, pl_module.scheduler.config.num_train_timesteps, (1,), generator=g))
            noise_t = torch.stack(noise).to(latents)  # (B, 4, h, w)
            t_t = torch.cat(t).to(latents.device)  # (B,)
            return noise_t, t_t, pl_module.scheduler.add_noise(latents, noise_t, t_t)

        def context(tokens, valid, latents, record):
            ctx = cls._context(pl_module, tokens, valid, latents, record)
            ctx.gumbel_tau = None
            return ctx

        pl_module._sample_noise = sample_noise
        pl_module._context = context


class KeyLog(L.Callback):
    """Append every training batch's sample keys of this rank to `<dir>/keys-rank<r>.jsonl`."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / f"keys-rank{trainer.global_rank}.jsonl").open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": list(batch["key"])}) + "\n")


class RankAdapters(L.Callback):
    """At the end of training, save this rank's adapter weights, stage and logged metrics to `<dir>/rank<r>.pt`:
    the checkpoint holds rank 0's only, and DDP replicas must agree."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in pl_module.adapter_state_dict().items()}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save({"stage": pl_module.stage, "state": state, "metrics": metrics},
                   self.dir / f"rank{trainer.global_rank}.pt")
