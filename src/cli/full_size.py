"""`python -m src.cli.full_size` (`make full-size`): the stage configs' training commands, generation and export at
SD1.5 size on the CPU, on random weights, timed (src/benchmarks/full_size.py).

    python -m src.cli.full_size                               # artifacts/full-size: 8.5 GB of weights, ~11 GB RSS
    python -m src.cli.full_size --arch tiny --out /tmp/fs     # the same steps on the tiny architectures (seconds)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.benchmarks import full_size
from src.cli import exit_status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.cli.full_size", description=full_size.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["sd15", "tiny"], default="sd15",
                   help="sd15: SD1.5 UNet/VAE/text encoder, ViT-H/14, IR-101 (default); tiny: the embedded default's")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: artifacts/full-size, artifacts/full-size-tiny with --arch tiny)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every command (default 2)")
    p.add_argument("--steps", type=int, default=2, help="training steps per stage (default 2)")
    p.add_argument("--infer-steps", type=int, default=4, help="denoising steps of the generation (default 4)")
    p.add_argument("--face", dest="faces", action="append", type=Path, default=[], metavar="PHOTO",
                   help="a face photo per identity to generate with (default: two written from matplotlib's sample)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every step; print the table; exit status 1 when a step failed (its error is in the report)."""
    a = build_parser().parse_args(argv)
    if a.threads < 1 or a.steps < 1 or a.infer_steps < 1:
        raise SystemExit(f"--threads, --steps and --infer-steps must be >= 1 (got {a.threads}, {a.steps}, "
                         f"{a.infer_steps})")
    out = a.out or Path("artifacts/full-size" + ("-tiny" if a.arch == "tiny" else ""))
    opts = full_size.Options(arch=a.arch, out=out, threads=a.threads, steps=a.steps, infer_steps=a.infer_steps,
                             faces=a.faces)
    report = full_size.run(opts)
    print("\n" + full_size.table(report))
    print(f"\nreport: {out / 'report.json'}")
    failed = [r for r in report["rows"] if r.get("error")]
    for r in failed:
        print(f"\n{r['step']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def console() -> None:
    """Console script (see [project.scripts] for the other commands)."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
