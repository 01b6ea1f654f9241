"""Explicit or safe resuming for training (`python -m src.train`; docs/running_at_scale.md, "What a resume guarantees").

`fit` stores the run's settings (`run_settings`) in every checkpoint (`callbacks.reliability.RunSettings`);
a run started without `--ckpt_path` resumes from the checkpoint Lightning finds by itself only when that
checkpoint holds the same settings (`choose_resume`), and stops before training otherwise.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from callbacks.reliability import NOT_SET, read_run_settings, settings_diff

log = logging.getLogger(__name__)


# Run settings: what decides a run's training trajectory, stored in its checkpoints and compared before an
# automatic resume. Everything under `model` and `data`, and `seed_everything`, except the keys below (speed
# and memory options that leave the loss unchanged, a safety stop, the validation data); the trainer's
# numerics and batch geometry (`TRAINER_SETTINGS`, resolved values); the init arguments of the callbacks
# that steer training (`STEERING_CALLBACKS`). Not compared: how long to train (max_steps, max_epochs),
# logging, validation, checkpointing, progress bars, fast_dev_run, torch_threads.
UNCOMPARED = frozenset({
    "model.gradient_checkpointing", "model.channels_last", "model.compile_unet", "model.compile_backend",
    "model.compile_mode", "model.feature_cache", "model.max_nonfinite_steps",
    "data.val_shards", "data.pin_memory", "data.prefetch_factor",
})
# Given on the command line or in the config, these model settings hold on an explicit resume too (LightningCLI
# would build the model from the checkpoint's hyperparameters): the uncompared speed, memory and safety options,
# and `init_from`, whose weights the restored checkpoint replaces (its file may be gone by then).
KEPT_ON_RESUME = tuple(sorted(k for k in UNCOMPARED if k.startswith("model."))) + ("model.init_from",)
TRAINER_SETTINGS = ("precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                    "limit_train_batches")
STEERING_CALLBACKS = ("callbacks.reliability.ResumableRNG", "callbacks.stage_switch.StageSwitch")


class ResumeSettingsError(RuntimeError):
    """A run would resume by itself from a checkpoint not written with its settings (raised before training)."""


def _plain(value: Any) -> Any:
    """`value` as plain, comparable types: dicts, lists, strings, numbers, booleans, None (a function or
    class by its import path; any other object by its type's)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Dotted keys for nested dicts (`class_path` kept, `init_args` folded into its parent, as on the CLI)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(prefix if k == "init_args" else f"{prefix}.{k}", v, out)
    else:
        out[prefix] = value


def run_settings(config: Namespace, trainer: L.Trainer) -> dict[str, Any]:
    """The settings of a `fit` run that decide its training trajectory, as {dotted key: plain value}."""
    out: dict[str, Any] = {}
    for section in ("model", "data"):
        _flatten(section, _plain(config.get(section)), out)
    out = {k: v for k, v in out.items() if k not in UNCOMPARED}
    out["seed_everything"] = _plain(config.get("seed_everything"))
    for key in TRAINER_SETTINGS:
        out[f"trainer.{key}"] = _plain(getattr(trainer, key))
    limit = trainer.limit_train_batches  # Lightning: an int counts batches, a float is a share of the epoch
    if isinstance(limit, (int, float)) and not isinstance(limit, bool):
        out["trainer.limit_train_batches"] = (f"{limit} batches" if isinstance(limit, int)
                                              else f"{limit:g} of each epoch")
    out["trainer.world_size"] = trainer.num_devices * trainer.num_nodes
    callbacks = _plain(config.get("trainer.callbacks")) or []
    seen: dict[str, int] = {}
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(cb, dict) or cb.get("class_path") not in STEERING_CALLBACKS:
            continue
        name = cb["class_path"].rsplit(".", 1)[1]
        seen[name] = seen.get(name, 0) + 1
        key = f"trainer.callbacks.{name}" + (f"[{seen[name] - 1}]" if seen[name] > 1 else "")
        _flatten(key, cb.get("init_args") or {}, out)
    return out


def lightning_resume_path(trainer: L.Trainer, ckpt_path: str | None = None) -> str | None:
    """The checkpoint file `trainer.fit(ckpt_path=ckpt_path)` restores, chosen by Lightning's own rule.

    With `ckpt_path=None`, Lightning 2.6 resumes without being asked: from the newest `hpc_ckpt_<n>.ckpt` in
    `trainer.default_root_dir` on SLURM, and otherwise, when an `OnExceptionCheckpoint` callback is present,
    from the newest (by modification time) of its `on_exception.ckpt` and every ModelCheckpoint's `last*.ckpt`.
    """
    before = trainer.state.fn
    trainer.state.fn = TrainerFn.FITTING  # Lightning looks for "last" only while fitting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without a model" / "no last checkpoint": said below
            path = trainer._checkpoint_connector._parse_ckpt_path(
                TrainerFn.FITTING, ckpt_path, model_provided=True, model_connected=False)
    finally:
        trainer.state.fn = before
    return None if path is None else str(path)


def _show(value: Any) -> str:
    return value if value == NOT_SET else json.dumps(value, default=str)


def _differences(path: str, settings: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(why the stored settings cannot be compared, or None; one "key: old -> new" line per difference)."""
    entry = read_run_settings(path)
    if entry is None or entry.get("settings") is None:
        why = (entry or {}).get("note") or ("it holds no run settings (written before checkpoints recorded them, "
                                            "or saved weights-only)")
        return why, []
    return None, [f"{k}: {_show(old)} -> {_show(new)}" for k, old, new in settings_diff(entry["settings"], settings)]


def _info(message: str, warning: bool = False) -> None:
    if rank_zero_only.rank == 0:
        (log.warning if warning else log.info)(message)


def choose_resume(trainer: L.Trainer, ckpt_path: str | None, settings: dict[str, Any]) -> str | None:
    """The `ckpt_path` to give `trainer.fit`: explicit or safe resuming (see docs/running_at_scale.md).

    - `ckpt_path` given: resume as asked (a warning lists the settings that differ from the checkpoint's).
    - fast_dev_run: never resume by itself, and write no checkpoint (its checkpoint callbacks are removed:
      OnExceptionCheckpoint would make it resume, and Lightning 2.6's ModelCheckpoint(save_last=True) writes
      last.ckpt at the end of a fast_dev_run too, over the real run's).
    - otherwise, where Lightning would resume by itself: that file when it holds the same settings (logged);
      else ResumeSettingsError naming the file, its folder and each setting that differs.
    """
    if trainer.fast_dev_run:  # a smoke test leaves nothing a later run would resume from
        dropped = [cb for cb in trainer.callbacks if isinstance(cb, Checkpoint)]
        trainer.callbacks = [cb for cb in trainer.callbacks if cb not in dropped]

    if ckpt_path is not None:
        path = None
        if str(ckpt_path) in ("last", "hpc"):
            try:
                path = lightning_resume_path(trainer, str(ckpt_path))
            except Exception:  # noqa: BLE001  (fit reports it again)
                path = None
        elif Path(ckpt_path).is_file():
            path = str(ckpt_path)
        try:
            why, lines = _differences(path, settings) if path is not None else (None, [])
        except ValueError:  # unreadable: Lightning's own load reports it
            path = None
        if path is not None:
            if why or lines:
                _info(f"Resuming from {path} as --ckpt_path asks, although it was not written with this run's "
                      f"settings ({why or 'checkpoint -> this run: ' + '; '.join(lines)}). Its weights, optimizer "
                      "state (learning rates included) and step are restored.", warning=True)
            else:
                _info(f"Resuming from {path} as --ckpt_path asks; it was written with the same settings.")
        return ckpt_path

    if trainer.fast_dev_run:
        candidate = lightning_resume_path(trainer)
        if candidate is not None:
            raise ResumeSettingsError(
                f"fast_dev_run does not resume, but Lightning would restore {candidate} (a SLURM requeue checkpoint "
                f"in trainer.default_root_dir {Path(candidate).parent}): move it, or pass another "
                "--trainer.default_root_dir.")
        if dropped:
            _info("fast_dev_run: starting fresh; no resume from the checkpoint folder and no checkpoint written.")
        return None

    candidate = lightning_resume_path(trainer)
    if candidate is None:
        return None
    why, lines = _differences(candidate, settings)
    if why is None and not lines:
        _info(f"Resuming from {candidate} (found by Lightning in its checkpoint folder): it was written with "
              f"the same settings ({len(settings)} compared).")
        return candidate
    folder = Path(candidate).parent
    detail = f"{why}." if why else "Settings that differ (checkpoint -> this run):\n  " + "\n  ".join(lines)
    raise ResumeSettingsError(
        f"Not resuming from {candidate}: a run started without --ckpt_path resumes from the checkpoint in its "
        f"folder {folder} only when that checkpoint was written with the same settings.\n{detail}\n"
        f"Nothing was trained. Either\n"
        f"  - resume from it anyway: --ckpt_path={candidate} (the model is then built from the checkpoint's "
        f"hyperparameters, and its weights, optimizer state with its learning rates, and step are restored), or\n"
        f"  - start fresh: move or delete {candidate} (and any other last*.ckpt, on_exception.ckpt or "
        f"hpc_ckpt_*.ckpt there), or write this run's checkpoints to another folder (the dirpath of its "
        f"ModelCheckpoint and OnExceptionCheckpoint callbacks).")


def model_settings(config: Namespace) -> dict[str, Any]:
    """The `model.*` settings of a subcommand's config, as {dotted key: plain value}."""
    out: dict[str, Any] = {}
    _flatten("model", _plain(config.get("model")), out)
    return out


def warn_replaced_model_settings(ckpt_path: Any, given: dict[str, Any], used: dict[str, Any]) -> None:
    """Warn about each given `model.*` setting that LightningCLI replaced by the hyperparameters of `--ckpt_path`."""
    lines = [f"{k}: {_show(new)} (given) -> {_show(old)} (checkpoint)" for k, new, old in settings_diff(given, used)]
    if lines:
        _info(f"--ckpt_path {ckpt_path}: LightningCLI builds the model with the checkpoint's hyperparameters, which "
              "replace these given settings: " + "; ".join(lines), warning=True)
