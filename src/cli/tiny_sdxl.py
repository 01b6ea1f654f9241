"""`uniportrait-tiny-sdxl` / `python -m src.cli.tiny_sdxl`: the tiny SDXL world (src/tiny/sdxl.py), written from a
built SD1.5 tiny world (`make tiny`)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from src.cli import exit_status, run_or_exit
from src.tiny.architectures import tiny_components
from src.tiny.sdxl import SD15_WORLD, build_sdxl


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m src.cli.tiny_sdxl", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("artifacts/tiny-sdxl"), help="the world's folder")
    p.add_argument("--sd15-world", type=Path, default=SD15_WORLD, help="a built SD1.5 tiny world")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run_or_exit(lambda a: build_sdxl(a.out, a.sd15_world, a.seed), args)
    print(f"tiny SDXL world at {out} ({tiny_components(out).arch})")
    return out


def console() -> None:
    """Console script `uniportrait-tiny-sdxl`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
