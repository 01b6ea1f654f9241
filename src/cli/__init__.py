"""Entry points: argument parsing and calls into the library, nothing else.

Each module here is one command, run as `python -m src.cli.<name>`, as a console script (`uniportrait-train`,
..., see `[project.scripts]` in pyproject.toml) and mostly with `python -m` under a historical name
(`python -m src.train` is `python -m src.cli.train`). Each has `main(argv=None)` (train: `main(args=None,
run=True)`, the LightningCLI), which tests call with the arguments a user types and which returns what the
command made where there is something to return (the files, counts or results; None for the servers and
`generate`, which writes its files), and `console()`, the console script, which turns that into an exit
status.

Library modules never import from this package (tests/test_layout.py checks it).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def exit_status(result: Any) -> int:
    """The process exit status for what a `main` returned: an int is the status, anything else is success."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_or_exit(run_fn: Callable[[argparse.Namespace], T], args: argparse.Namespace) -> T:
    """Run a CLI's `run(args)`; a user error (bad photo, missing file, wrong key or value) becomes
    `error: ...` on stderr and exit code 2 instead of a traceback. Shared by generate, app, evaluate, export and
    tiny_sdxl."""
    from src.faces import NoFaceError, UnreadableImageError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_fn(args)
    except (NoFaceError, UnreadableImageError, FileNotFoundError, KeyError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from err


def add_shipped_weight_options(p: argparse.ArgumentParser, assets: Path, parts: str, make_target: str) -> None:
    """--pretrain, --assets and --save-assets of a tiny world's builder (`src.tiny.assets`): its pretrained
    `parts` (e.g. "the UNet (~7 min on 2 cores)") are copied from the shipped `assets` when their manifest
    matches, pretrained here with --pretrain, and written back as assets by `make_target` (--save-assets)."""
    p.add_argument("--pretrain", action="store_true",
                   help=f"pretrain {parts} here instead of copying the shipped weights of --assets")
    p.add_argument("--assets", type=Path, default=assets,
                   help="shipped pretrained weights, used when their manifest.json was made with these options "
                        "(default: %(default)s)")
    p.add_argument("--save-assets", type=Path, default=None, metavar="DIR",
                   help="after building with --pretrain, write the pretrained weights and their manifest to DIR "
                        f"(what `make {make_target}` does for {assets.name})")


def shipped_weight_command(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None,
                           module: str) -> str:
    """Check the options of `add_shipped_weight_options` (--save-assets needs --pretrain: only weights pretrained
    here can be shipped) and return the command line (`python -m module ...`) a manifest records as the one
    that made them."""
    if args.save_assets and not args.pretrain:
        p.error("--save-assets needs --pretrain (only weights pretrained here can be shipped)")
    return f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])
