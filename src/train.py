"""Training entry point: `python -m src.train fit --config configs/stage1.yaml`.

A thin LightningCLI. Stage configs hold only what differs from the config they name in
`inherits:` (a path relative to the file); the chain is merged (OmegaConf: mappings merge, lists
are replaced) before jsonargparse validates the result against the typed signatures.

Resuming is explicit or safe (`src.resume`): `fit` stores the run's settings in every checkpoint; a run
started without `--ckpt_path` resumes from the checkpoint Lightning finds by itself only when that
checkpoint holds the same settings, and stops before training otherwise.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LightningCLI
from omegaconf import OmegaConf

from callbacks.reliability import RunSettings
from src.resume import ResumeSettingsError, choose_resume, model_settings, run_settings, warn_replaced_model_settings

INHERITS = "inherits"


def resolve_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Load a YAML config, following `inherits:` chains (cycles are an error naming the files)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config inheritance cycle: {' -> '.join(map(str, _seen + (path,)))}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config {path} must be a mapping at top level")
    parent = cfg.pop(INHERITS, None)
    if parent is None:
        return cfg
    base = resolve_config(path.parent / parent, _seen + (path,))
    merged = OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(cfg))
    return OmegaConf.to_container(merged)


def expand_config_args(args: list[str], tmpdir: str) -> list[str]:
    """Replace each `--config FILE` whose file uses `inherits:` by the merged config."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        value = None
        if a == "--config" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif a.startswith("--config="):
            value, i = a.split("=", 1)[1], i + 1
        else:
            out.append(a)
            i += 1
            continue
        raw = yaml.safe_load(Path(value).read_text()) if Path(value).is_file() else None
        if isinstance(raw, dict) and INHERITS in raw:
            merged = Path(tmpdir) / f"merged_{len(out)}_{Path(value).name}"
            merged.write_text(yaml.safe_dump(resolve_config(value), sort_keys=False))
            value = str(merged)
        out += ["--config", value]
    return out


class UniPortraitCLI(LightningCLI):
    """LightningCLI plus `torch_threads` (intra-op CPU threads of the training process) and safe resuming.

    The Makefile runs every process with OMP_NUM_THREADS=1 (the DataLoader workers and test
    subprocesses share two cores); a config may give the training process itself more threads.
    `fit` attaches `RunSettings` (the run's settings in every checkpoint) and resumes without `--ckpt_path`
    only from a checkpoint written with the same settings (`choose_resume`).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--torch_threads", type=Optional[PositiveInt], default=None,  # noqa: UP045 (jsonargparse runtime type)
            help="torch.set_num_threads() for the training process (None: OMP_NUM_THREADS / torch's choice)",
        )

    def before_instantiate_classes(self) -> None:
        threads = (self.config[self.subcommand] if self.subcommand else self.config).get("torch_threads")
        if threads is not None:
            torch.set_num_threads(threads)
            logging.getLogger(__name__).info("torch_threads: %d intra-op CPU thread(s)", torch.get_num_threads())

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's own step: with `--ckpt_path FILE`, the model section of the config is replaced by the
        checkpoint's hyperparameters. Say which given model settings that replaced."""
        sub = self.config.get("subcommand")
        given = model_settings(self.config[sub]) if sub else {}
        super()._parse_ckpt_path()
        if sub:
            warn_replaced_model_settings(self.config[sub].get("ckpt_path"), given, model_settings(self.config[sub]))

    def before_fit(self) -> None:
        """Store the run's settings in its checkpoints; decide from which checkpoint, if any, to resume."""
        config = self.config["fit"]
        settings = run_settings(config, self.trainer)
        self.trainer.callbacks.insert(0, RunSettings(settings))
        self.config_init["fit"]["ckpt_path"] = choose_resume(self.trainer, config.get("ckpt_path"), settings)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (tests call `main([...])` with the same arguments a user types)."""
    from datamodules.datamodule import FaceShardDataModule  # noqa: F401
    from src.module import UniPortraitModule  # noqa: F401  (import here keeps --help fast to fail)

    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if args is None else args)
    if not run and args and args[0] in ("fit", "validate", "test", "predict"):
        args = args[1:]  # run=False builds the classes without a subcommand
    # We always hand LightningCLI the (config-expanded) arguments, also when they came from sys.argv.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # Lightning's note on resuming without --ckpt_path; `choose_resume` logs what happens instead.
    warnings.filterwarnings("ignore", message=r"`\.fit\(ckpt_path=None\)` was called without a model")
    with tempfile.TemporaryDirectory(prefix="uniportrait-cfg-") as tmp:
        return UniPortraitCLI(
            UniPortraitModule,
            FaceShardDataModule,
            args=expand_config_args(args, tmp),
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
        )


if __name__ == "__main__":
    try:
        main()
    except ResumeSettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
