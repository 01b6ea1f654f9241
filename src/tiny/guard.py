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

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
