"""Training entry point: `python -m src.train fit --config configs/stage1.yaml`.

A thin LightningCLI. Stage configs hold only what differs from the config they name in
`inherits:` (a path relative to the file); the chain is merged (OmegaConf: mappings merge, lists
are replaced) before jsonargparse validates the result against the typed signatures.
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
    """LightningCLI plus `torch_threads`: intra-op CPU threads of the training process.

    The Makefile runs every process with OMP_NUM_THREADS=1 (the DataLoader workers and test
    subprocesses share two cores); a config may give the training process itself more threads.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--torch_threads", type=Optional[PositiveInt], default=None,
            help="torch.set_num_threads() for the training process (None: OMP_NUM_THREADS / torch's choice)",
        )

    def before_instantiate_classes(self) -> None:
        threads = (self.config[self.subcommand] if self.subcommand else self.config).get("torch_threads")
        if threads is not None:
            torch.set_num_threads(threads)
            logging.getLogger(__name__).info("torch_threads: %d intra-op CPU thread(s)", torch.get_num_threads())


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (tests call `main([...])` with the same arguments a user types)."""
    from src.module import UniPortraitModule  # noqa: F401  (import here keeps --help fast to fail)
    from datamodules.datamodule import FaceShardDataModule  # noqa: F401

    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if args is None else args)
    if not run and args and args[0] in ("fit", "validate", "test", "predict"):
        args = args[1:]  # run=False builds the classes without a subcommand
    # We always hand LightningCLI the (config-expanded) arguments, also when they came from sys.argv.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
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
    main()
