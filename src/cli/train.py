"""`uniportrait-train` / `python -m src.train fit --config configs/stage1.yaml`: training.

A thin LightningCLI. Each `--config` file is resolved first (`src.config.resolve_config`: its
`inherits:` chain merged, named callbacks turned into a list, `${...}` interpolations resolved);
jsonargparse then validates the result against the typed signatures.

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
from typing import Optional

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.cli import LightningCLI

from callbacks.reliability import RunSettings
from src.config import expand_config_args
from src.resume import (
    KEPT_ON_RESUME,
    ResumeSettingsError,
    choose_resume,
    model_settings,
    run_settings,
    warn_replaced_model_settings,
)


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
        checkpoint's hyperparameters. The given settings that cannot change the trajectory (`KEPT_ON_RESUME`:
        speed and memory options, a safety stop, `init_from`, whose weights the checkpoint replaces) are put
        back; say which other given settings the checkpoint replaced."""
        sub = self.config.get("subcommand")
        given = model_settings(self.config[sub]) if sub else {}
        super()._parse_ckpt_path()
        if sub:
            for key in KEPT_ON_RESUME:
                if key in given:
                    self.config[sub][key] = given[key]
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


def console() -> None:
    """Console script `uniportrait-train`: a resume refused for other settings exits 2 with its reason."""
    try:
        main()
    except ResumeSettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
