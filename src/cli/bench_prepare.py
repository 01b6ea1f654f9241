"""`python -m src.cli.bench_prepare`: shard-preparation throughput, old path against downscaled, batched and
multi-process detection (src/benchmarks/prepare.py); recorded in docs/benchmarks.md only with --record."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from src.benchmarks import prepare as bench
from src.cli import exit_status
from src.faces import DEFAULT_DETECT_SIZE


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI entry point; returns the table's rows."""
    p = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="how many photos")
    p.add_argument("--photo-size", type=int, default=1280, help="longer side of the generated photos (px)")
    p.add_argument("--input", type=Path, default=None, help="a folder of real photos to use instead")
    p.add_argument("--workers", type=int, default=2, help="processes of the multi-process row")
    p.add_argument("--detect-size", type=int, default=DEFAULT_DETECT_SIZE, help="detection copy's longer side")
    p.add_argument("--detect-batch", type=int, default=8, help="inputs detected together")
    p.add_argument("--device", default="cpu", help="torch device for MTCNN (every row)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the one-process rows")
    p.add_argument("--distributor", action=argparse.BooleanOptionalAction, default=True,
                   help="also the Ray distributor's row (a local instance of --workers CPUs)")
    p.add_argument("--work-dir", type=Path, default=None, help="photos and outputs (default: a temporary dir)")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=False,
                   help="rewrite the section between the bench:prepare markers of --doc (default: print only)")
    a = p.parse_args(argv)
    if a.images < 1 or a.workers < 1:
        raise SystemExit(f"--images and --workers must be >= 1, got {a.images} and {a.workers}")
    work, temporary = bench.scratch_dir(a.work_dir)
    try:
        photos, described = bench.photos_for(a.input, a.images, a.photo_size, work)
        rows = bench.run(photos, work, a.workers, a.detect_size, a.detect_batch, a.device, a.threads,
                         a.distributor)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print(bench.table(rows))
    if a.record:
        bench.record(rows, a.doc, described, a.device, a.threads)
        print(f"recorded in {a.doc}")
    return rows


def console() -> None:
    """Console script entry point."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
