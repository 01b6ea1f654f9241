"""The learning guard of the embedded default: does `make demo` still show that the mechanics learn?

    python -m src.guard control [TRAIN ARGS]   stage 2 again with routing_lambda = 0 (the control)
    python -m src.guard check                  every figure against its threshold; exit 1 on a miss
    python -m src.guard seed --seed 1 --runs runs/tiny_seed1 [TRAIN ARGS]
                                               stage 1, stage 2 and the control under another seed, in
                                               their own folder (then `check --runs runs/tiny_seed1`)

`make guard` runs both after `make demo` (CI runs it on the shortened demo). `check` reads the
`report.json` each training run writes (`callbacks.training_report.write_report`) and requires:
  1. stage 1: on held-out images of the training identities (seen) and of people never trained on
     (unseen), the identity gap (denoising loss with another person's identity tokens minus with the
     image's own, paired per image, several noise draws) is positive by at least `--min-gap-se`
     standard errors;
  2. stage 2: in the t<250 band, routing accuracy inside faces beats chance (1 / number of faces) by
     at least `--min-routing-margin` in every group (seen / unseen identities x 2 / 3 faces);
  3. the control (stage 2 trained without the routing loss) stays within `--max-control-deviation`
     of chance in that band: without the loss the router learns no assignment, so a pass of 2 that
     the control also passes would mean the figure measures something else.
Every figure is printed beside its threshold; a miss names the figure, the file and the threshold.
The thresholds' measurements are in docs/benchmarks.md ("The learning guard").
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STAGE1_CONFIG = Path("configs/tiny/stage1.yaml")
DEFAULT_STAGE2_CONFIG = Path("configs/tiny/stage2.yaml")
CONTROL_NAME = "stage2_lambda0"
BAND = "t<250"


@dataclass
class Figure:
    """One guarded figure: its name, value, the threshold, whether it passes, and context for the reader."""

    name: str
    value: float
    threshold: str
    passed: bool
    source: Path
    detail: str = ""

    def line(self) -> str:
        return (f"[guard] {'ok  ' if self.passed else 'FAIL'} {self.name}: {self.value:.4f} "
                f"(required {self.threshold}; {self.detail}{'; ' if self.detail else ''}{self.source})")


def read_section(path: Path, section: str) -> dict[str, Any]:
    """A section of a run's report.json; a missing file or section is an error naming both."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no report (run `make demo` and `python -m src.guard control` first)")
    report = json.loads(path.read_text())
    if section not in report:
        raise KeyError(f"{path}: no section {section!r} (sections: {sorted(report)}); "
                       "was the run's callback configured?")
    return report[section]


def faces_in(group: str) -> int:
    """'seen/2faces' -> 2."""
    return int(group.rsplit("/", 1)[1].removesuffix("faces"))


def identity_figures(path: Path, split: str, min_gap_se: float) -> list[Figure]:
    after = read_section(path, "identity_probe")["after"]
    if split not in after:
        raise KeyError(f"{path}: identity_probe has no split {split!r} (splits: {sorted(after)})")
    r = after[split]
    z = r["gap"] / r["gap_se"] if r.get("gap_se") else float("-inf")
    detail = f"gap {r['gap']:+.6f} +- {r['gap_se'] or 0:.6f} over {r['images']} images x {r['draws']} noise draws"
    return [Figure(f"stage 1 identity gap, {split} identities, in standard errors", z, f">= {min_gap_se:g}",
                   z >= min_gap_se, path, detail)]


def routing_figures(path: Path, what: str, margin: float | None = None, deviation: float | None = None) -> list[Figure]:
    after = read_section(path, "routing_accuracy")["after"]
    out = []
    for group, bands in sorted(after.items()):
        chance = 1.0 / faces_in(group)
        acc = float(bands[BAND])
        others = ", ".join(f"{b} {v:.3f}" for b, v in bands.items() if b != BAND)
        name, detail = f"{what} routing accuracy {BAND}, {group}", f"chance {chance:.3f}; other bands: {others}"
        if margin is not None:
            out.append(Figure(name, acc, f">= {chance + margin:.3f}", acc >= chance + margin, path, detail))
        if deviation is not None:
            lo, hi = chance - deviation, chance + deviation
            out.append(Figure(name, acc, f"in [{lo:.3f}, {hi:.3f}]", lo <= acc <= hi, path, detail))
    if not out:
        raise KeyError(f"{path}: routing_accuracy has no group")
    return out


def check(runs: Path, control: str, splits: list[str], min_gap_se: float, min_routing_margin: float,
          max_control_deviation: float) -> list[Figure]:
    """Every guarded figure of `runs` (a folder with stage1/, stage2/ and the control's report.json)."""
    return ([f for split in splits for f in identity_figures(runs / "stage1" / "report.json", split, min_gap_se)]
            + routing_figures(runs / "stage2" / "report.json", "stage 2", margin=min_routing_margin)
            + routing_figures(runs / control / "report.json", "control (lambda = 0)", deviation=max_control_deviation))


def _run_folder(cfg: dict[str, Any]) -> Path:
    logger = cfg.get("trainer", {}).get("logger", {}).get("init_args", {})
    if "save_dir" not in logger or "name" not in logger:
        raise KeyError("trainer.logger.init_args needs save_dir and name (the run's folder)")
    return Path(logger["save_dir"]) / logger["name"]


def relocate(cfg: dict[str, Any], save_dir: str | None = None, name: str | None = None) -> dict[str, Any]:
    """A copy of a training config whose run folder (the logger's save_dir / name) is moved, with every
    callback `dirpath` inside the old folder moved along, so the run writes nothing into the old one."""
    cfg = copy.deepcopy(cfg)
    old = _run_folder(cfg)
    logger = cfg["trainer"]["logger"]["init_args"]
    logger["save_dir"] = save_dir if save_dir is not None else logger["save_dir"]
    logger["name"] = name if name is not None else logger["name"]
    new = _run_folder(cfg)
    for cb in cfg["trainer"].get("callbacks", []):
        args = cb.get("init_args", {})
        if "dirpath" in args and Path(args["dirpath"]).is_relative_to(old):
            args["dirpath"] = str(new / Path(args["dirpath"]).relative_to(old))
    return cfg


def control_config(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The stage-2 config with routing_lambda = 0, its logger renamed to `name` and every callback's
    `dirpath` moved from the logger's folder to the control's (so the control writes nothing into the
    stage-2 run's folder)."""
    cfg = relocate(cfg, name=name)
    cfg.setdefault("model", {})["routing_lambda"] = 0.0
    for cb in cfg["trainer"].get("callbacks", []):
        if cb.get("class_path", "").endswith(".RoutingAccuracyReport"):
            # same checkpoint, seed and router initialisation as stage 2: its "before" is stage 2's
            cb.setdefault("init_args", {})["measure_before"] = False
    return cfg


def seed_config(cfg: dict[str, Any], seed: int, runs: Path) -> dict[str, Any]:
    """A stage config under another seed whose run folder moves from its save_dir to `runs`; a stage-2
    `model.init_from` inside the old save_dir follows it there. The seed is all three of a run's:
    `seed_everything` (initialisation), every `ResumableRNG` callback's (per-step noise, timesteps,
    dropout) and `data.seed` (shard order, shuffling, crops); the world and its held-out splits stay."""
    _run_folder(cfg)  # a config without the logger's save_dir and name is a KeyError naming them
    old_save_dir = Path(cfg["trainer"]["logger"]["init_args"]["save_dir"])
    cfg = relocate(cfg, save_dir=str(runs))
    rngs = [cb for cb in cfg["trainer"].get("callbacks", []) if cb.get("class_path", "").endswith(".ResumableRNG")]
    if not rngs:
        raise KeyError("seed_config: no callbacks.reliability.ResumableRNG in trainer.callbacks (the run's seed)")
    for cb in rngs:
        cb.setdefault("init_args", {})["seed"] = seed
    cfg["seed_everything"] = seed
    cfg.setdefault("data", {})["seed"] = seed
    init_from = cfg.get("model", {}).get("init_from")
    if init_from and Path(init_from).is_relative_to(old_save_dir):
        cfg["model"]["init_from"] = str(runs / Path(init_from).relative_to(old_save_dir))
    return cfg


def _train(cfg: dict[str, Any], name: str, train_args: list[str]) -> None:
    from src.train import main as train_main

    with tempfile.TemporaryDirectory(prefix="uniportrait-guard-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        train_main(["fit", "--config", str(path), *train_args])


def run_control(config: Path, name: str, train_args: list[str]) -> None:
    from src.train import resolve_config

    _train(control_config(resolve_config(config), name), name, train_args)


def run_seed(seed: int, runs: Path, stage1: Path, stage2: Path, name: str, train_args: list[str]) -> None:
    """Stage 1, stage 2 and the control as `make demo` and `make guard` train them, under `seed`, in `runs`."""
    from src.train import resolve_config

    s1, s2 = seed_config(resolve_config(stage1), seed, runs), seed_config(resolve_config(stage2), seed, runs)
    _train(s1, "stage1", train_args)
    _train(s2, "stage2", train_args)
    _train(control_config(s2, name), name, train_args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("control", help="train stage 2 with routing_lambda = 0 (extra arguments go to src.train)")
    c.add_argument("--config", type=Path, default=DEFAULT_STAGE2_CONFIG)
    c.add_argument("--name", default=CONTROL_NAME, help="the control run's logger name (its folder)")
    sd = sub.add_parser("seed", help="stage 1, stage 2 and the control under another seed, in their own folder "
                                     "(extra arguments go to src.train)")
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


if __name__ == "__main__":
    sys.exit(main())
