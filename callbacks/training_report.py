"""End-of-run reports for the user: did the loss fall, does the identity pathway carry identity.

Each report prints its figures and writes them to the run's `report.json` (`write_report`), which
`python -m src.guard` checks against thresholds."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from src.metrics.identity import nearest_neighbour_identification

log = logging.getLogger(__name__)


class LossTrend(L.Callback):
    """Records the training loss every step; at the end prints the mean of the first and the last
    `fraction` of steps (the issue's check: the last 20% clearly below the first 20%)."""

    def __init__(self, key: str = "train/diffusion", fraction: float = 0.2) -> None:
        self.key, self.fraction = key, fraction
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        v = trainer.callback_metrics.get(self.key)
        if v is not None:
            self.values.append(float(v))

    def summary(self) -> dict[str, float] | None:
        n = int(len(self.values) * self.fraction)
        if n < 1:
            return None
        first = sum(self.values[:n]) / n
        last = sum(self.values[-n:]) / n
        return {"first": first, "last": last, "ratio": last / first}

    def on_train_end(self, trainer, pl_module) -> None:
        s = self.summary()
        if s is None or not trainer.is_global_zero:
            return
        pct = int(self.fraction * 100)
        print(
            f"[loss trend] {self.key}: first {pct}% of steps {s['first']:.4f} -> last {pct}% {s['last']:.4f} "
            f"(x{s['ratio']:.3f})",
            flush=True,
        )
        write_report(trainer, "loss_trend", {"key": self.key, "fraction": self.fraction, **s})

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values = list(state_dict.get("values", []))


def report_path(trainer) -> Path:
    """The run's `report.json`: in its logger's folder without the version (e.g. runs/tiny/stage1/report.json
    for a TensorBoardLogger with save_dir runs/tiny and name stage1), else in `trainer.default_root_dir`."""
    root = getattr(trainer.logger, "root_dir", None) if trainer.logger is not None else None
    return Path(root or trainer.default_root_dir) / "report.json"


def write_report(trainer, section: str, data: dict[str, Any]) -> Path:
    """Replace `section` of the run's report.json with `data`, keeping the other sections (rank 0 only;
    written atomically). A report that is not valid JSON is replaced, with a warning naming it."""
    path = report_path(trainer)
    if not trainer.is_global_zero:
        return path
    report: dict[str, Any] = {}
    if path.is_file():
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            log.warning("%s is not valid JSON (%s): replaced", path, e)
    report[section] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return path


def heldout_batches(pattern: str, resolution: int, batch_size: int, multi_id: bool, seed: int = 0,
                    max_batches: int | None = None) -> Iterator[dict[str, Any]]:
    """Deterministic batches of a held-out shard pattern (no shuffle, eval crop, no loader workers)."""
    from datamodules.datamodule import FaceShardDataModule

    dm = FaceShardDataModule(train_shards=pattern, val_shards=pattern, multi_id=multi_id, resolution=resolution,
                             batch_size=batch_size, num_workers=0, shuffle_buffer=0, seed=seed)
    dm.setup("validate")
    for i, batch in enumerate(dm.val_dataloader()):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


class IdentityProbe(L.Callback):
    """Before and after training: does the identity pathway carry identity, on held-out images?

    For every held-out image, the denoising loss with its own identity tokens and with those of another
    image of the batch showing other people (`UniPortraitModule.identity_gap`), under the same noise and
    timesteps, averaged over `draws` noise draws; the gap is the mean of these paired per-image
    differences (other - own), given with its standard error over images. The identity pathway carries
    identity when the gap is positive by several standard errors. Also how well the identity tokens
    alone tell the held-out people apart (nearest-neighbour identification, `src.metrics.identity`).
    Both are measured per named split (e.g. seen: new images of training identities; unseen: people
    never trained on), printed at the end of training and written to the run's `report.json`
    (section "identity_probe", see `write_report`).

    splits: name -> shard pattern (single-face shards); None: the datamodule's validation shards.
    max_batches: batches per split; draws: noise draws per batch (the same draws before and after).
    """

    def __init__(self, splits: dict[str, str] | None = None, max_batches: int = 8, draws: int = 4,
                 batch_size: int = 16, seed: int = 1234) -> None:
        if draws < 1:
            raise ValueError(f"IdentityProbe: draws must be >= 1, got {draws}")
        self.splits, self.max_batches, self.draws = splits, max_batches, draws
        self.batch_size, self.seed = batch_size, seed
        self.before: dict[str, dict[str, float | int | None]] | None = None

    def _split_batches(self, trainer) -> dict[str, Iterable[dict[str, Any]]]:
        """{split name: its batches}; a split whose shards do not exist is skipped with a warning naming it
        (the probe measures; it does not stop a run, and `python -m src.guard` fails on a missing split)."""
        from datamodules.loader import resolve_shards

        if self.splits:
            resolution = getattr(trainer.datamodule, "resolution", 64)
            found = {}
            for name, pattern in self.splits.items():
                try:
                    resolve_shards(pattern)
                except FileNotFoundError as e:
                    log.warning("identity probe: split %r skipped: %s", name, e)
                    continue
                found[name] = heldout_batches(pattern, resolution, self.batch_size, multi_id=False, seed=self.seed)
            return found
        dm = trainer.datamodule
        if dm is None or getattr(dm, "val_shards", None) is None:
            return {}
        return {"held-out": dm.val_dataloader()}

    def measure(self, trainer, pl_module) -> dict[str, dict[str, float | int | None]]:
        """{split: {"images", "own", "other", "gap", "gap_se", "token_nn"}} (token_nn None when no
        identity occurs twice; gap_se None for fewer than two images)."""
        was_training = pl_module.training
        pl_module.eval()
        results: dict[str, dict[str, float | int | None]] = {}
        for name, batches in self._split_batches(trainer).items():
            g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            own_all, other_all = [], []
            tokens: list[torch.Tensor] = []
            labels: list[str] = []
            for i, batch in enumerate(batches):
                if i >= self.max_batches:
                    break
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                own, other = pl_module.identity_gap(batch, generator=g, draws=self.draws)  # (M,) each
                own_all.append(own.double().cpu())
                other_all.append(other.double().cpu())
                with torch.no_grad():
                    t = pl_module.batch_identity_tokens(batch)  # (B, N, Q, D)
                ids, valid = batch["identity"], batch["face_valid"].cpu()  # B label lists, (B, N)
                known = torch.tensor([[bool(valid[b, n]) and n < len(ids[b]) and ids[b][n] is not None
                                       for n in range(valid.shape[1])] for b in range(len(ids))])  # (B, N)
                tokens.append(t[known.to(t.device)].float().cpu())  # (F, Q, D), faces in (sample, slot) order
                labels += [ids[b][n] for b, n in known.nonzero().tolist()]
            if not own_all or not torch.cat(own_all).numel():
                log.warning("identity probe: split %r has no image with a partner of another identity; skipped", name)
                continue
            own, other = torch.cat(own_all), torch.cat(other_all)  # (M,) each
            diff = other - own  # (M,) paired per-image differences
            se = float(diff.std(unbiased=True) / diff.numel() ** 0.5) if diff.numel() > 1 else None
            results[name] = {"images": int(diff.numel()), "draws": self.draws, "own": float(own.mean()),
                             "other": float(other.mean()), "gap": float(diff.mean()), "gap_se": se,
                             "token_nn": nearest_neighbour_identification(torch.cat(tokens), labels)}
        pl_module.train(was_training)
        return results

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.before is None:
            self.before = self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        after = self.measure(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        for when, res in (("before training", self.before), ("after training", after)):
            for name, r in (res or {}).items():
                print(f"[identity probe] {when}, {name} identities ({r['images']} images x {r['draws']} noise "
                      f"draws): held-out loss own identity {r['own']:.5f}, other identity {r['other']:.5f}, "
                      f"gap {format_gap(r)}; identity tokens' nearest-neighbour identification "
                      f"{'n/a' if r['token_nn'] is None else format(r['token_nn'], '.3f')}", flush=True)
        write_report(trainer, "identity_probe", {"global_step": trainer.global_step, "before": self.before,
                                                 "after": after})

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        b = state_dict.get("before")
        self.before = b if isinstance(b, dict) else None  # older checkpoints held an unpaired (own, other) tuple


def format_gap(r: dict[str, Any]) -> str:
    """'+0.00080 +- 0.00010 SE (8.0 SE)' for a probe result with "gap" and "gap_se"."""
    if not r.get("gap_se"):
        return f"{r['gap']:+.5f}"
    return f"{r['gap']:+.5f} +- {r['gap_se']:.5f} SE ({r['gap'] / r['gap_se']:+.1f} SE)"
