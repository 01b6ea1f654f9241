"""`uniportrait-bench` / `make bench`: the tiny preset's CPU training step (src/benchmarks/tiny_cpu.py), then on
a machine with CUDA the SD1.5-scale benchmark (`uniportrait-bench-sd15`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from src.benchmarks import tiny_cpu
from src.benchmarks.tiny_cpu import record, run, table
from src.cli import exit_status


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=tiny_cpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=Path("artifacts/tiny"), help="tiny world (make tiny)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--no-record", action="store_true", help="print only; do not rewrite the doc")
    a = p.parse_args(argv)
    if not (a.world / "base" / "unet").exists():
        raise SystemExit(f"no tiny world at {a.world}: run `make tiny` first")
    rows = run(a.world, a.batch_size, a.steps)
    print(table(rows))
    if not a.no_record:
        record(rows, a.doc)
        print(f"recorded in {a.doc}")
    if torch.cuda.is_available():
        from src.cli import bench_sd15

        bench_sd15.main(["--compile", "--big-batch", "64", "--doc", str(a.doc)]
                        + (["--no-record"] if a.no_record else []))
    else:
        print("no CUDA device: the SD1.5-scale benchmark (python -m src.bench_sd15) was skipped")


def console() -> None:
    """Console script `uniportrait-bench`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
