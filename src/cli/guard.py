"""`uniportrait-guard` / `python -m src.guard`: the embedded default's learning guard (src/tiny/guard.py).

`control` and `seed` train through `uniportrait-train` (extra arguments go to it); `check` prints every
figure beside its threshold and exits 1 on a miss.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from src.cli import exit_status
from src.cli.train import main as train_main
from src.config import resolve_config
from src.tiny import guard
from src.tiny.guard import (
    CONTROL_NAME,
    DEFAULT_STAGE1_CONFIG,
    DEFAULT_STAGE2_CONFIG,
    check,
    control_config,
    seed_config,
)


def _train(cfg: dict[str, Any], name: str, train_args: list[str]) -> None:

    with tempfile.TemporaryDirectory(prefix="uniportrait-guard-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        train_main(["fit", "--config", str(path), *train_args])


def run_control(config: Path, name: str, train_args: list[str]) -> None:

    _train(control_config(resolve_config(config), name), name, train_args)


def run_seed(seed: int, runs: Path, stage1: Path, stage2: Path, name: str, train_args: list[str]) -> None:
    """Stage 1, stage 2 and the control as `make demo` and `make guard` train them, under `seed`, in `runs`."""

    s1, s2 = seed_config(resolve_config(stage1), seed, runs), seed_config(resolve_config(stage2), seed, runs)
    _train(s1, "stage1", train_args)
    _train(s2, "stage2", train_args)
    _train(control_config(s2, name), name, train_args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=guard.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("control",
                       help="train stage 2 with routing_lambda = 0 (extra arguments go to uniportrait-train)")
    c.add_argument("--config", type=Path, default=DEFAULT_STAGE2_CONFIG)
    c.add_argument("--name", default=CONTROL_NAME, help="the control run's logger name (its folder)")
    sd = sub.add_parser("seed", help="stage 1, stage 2 and the control under another seed, in their own folder "
                                     "(extra arguments go to uniportrait-train)")
    sd.add_argument("--seed", type=int, required=True)
    sd.add_argument("--runs", type=Path, required=True, help="folder for stage1/ stage2/ and the control")
    sd.add_argument("--stage1-config", type=Path, default=DEFAULT_STAGE1_CONFIG)
    sd.add_argument("--stage2-config", type=Path, default=DEFAULT_STAGE2_CONFIG)
    sd.add_argument("--name", default=CONTROL_NAME, help="the control run's folder name")
    k = sub.add_parser("check", help="check the figures of the runs' report.json files against the thresholds")
    k.add_argument("--runs", type=Path, default=Path("runs/tiny"), help="folder with stage1/ stage2/ and the control")
    k.add_argument("--control", default=CONTROL_NAME)
    k.add_argument("--splits", nargs="+", default=["seen", "unseen"], help="identity-probe splits whose gap is guarded")
    k.add_argument("--min-gap-se", type=float, default=3.0)
    k.add_argument("--min-routing-margin", type=float, default=0.15)
    k.add_argument("--max-control-deviation", type=float, default=0.08)
    a, rest = p.parse_known_args(argv)
    if a.command == "control":
        run_control(a.config, a.name, rest)
        return 0
    if a.command == "seed":
        run_seed(a.seed, a.runs, a.stage1_config, a.stage2_config, a.name, rest)
        return 0
    if rest:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    figures = check(a.runs, a.control, a.splits, a.min_gap_se, a.min_routing_margin, a.max_control_deviation)
    for f in figures:
        print(f.line(), flush=True)
    failed = [f for f in figures if not f.passed]
    if failed:
        print(f"[guard] {len(failed)} of {len(figures)} figures missed their thresholds: "
              + "; ".join(f"{f.name} = {f.value:.4f}, required {f.threshold}" for f in failed),
              file=sys.stderr)
        return 1
    print(f"[guard] all {len(figures)} figures meet their thresholds")
    return 0


def console() -> None:
    """Console script `uniportrait-guard`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
