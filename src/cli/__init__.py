"""Entry points: argument parsing and calls into the library, nothing else.

Each module here is one command, run as a console script (`uniportrait-train`, ..., see
`[project.scripts]` in pyproject.toml) or with `python -m` under its historical name
(`python -m src.train` is `python -m src.cli.train`). Each has `main(argv=None)`, which tests call
with the arguments a user types and which returns what the command made, and `console()`, the
console script, which turns that into an exit status.

Library modules never import from this package (tests/test_layout.py checks it).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def exit_status(result: Any) -> int:
    """The process exit status for what a `main` returned: an int is the status, anything else is success."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_or_exit(run_fn: Callable[[argparse.Namespace], T], args: argparse.Namespace) -> T:
    """Run a CLI's `run(args)`; a user error (bad photo, missing file, wrong key or value) becomes
    `error: ...` on stderr and exit code 2 instead of a traceback. Shared by generate, evaluate and export."""
    from src.faces import NoFaceError, UnreadableImageError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_fn(args)
    except (NoFaceError, UnreadableImageError, FileNotFoundError, KeyError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from err
