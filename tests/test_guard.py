"""The learning guard (`python -m src.guard`): figures against thresholds, and the control run's config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.cli import guard as guard_cli
from src.config import resolve_config
from src.tiny import guard

ROOT = Path(__file__).resolve().parents[1]
BANDS = ("t<250", "250<=t<500", "500<=t<750", "t>=750", "all")


def _routing(acc2: float, acc3: float) -> dict:
    return {"after": {f"{split}/{n}faces": {b: (acc2 if n == 2 else acc3) for b in BANDS}
                      for split in ("seen", "unseen") for n in (2, 3)}}


def _write(runs: Path, gap: float, se: float, routed: tuple[float, float], control: tuple[float, float]) -> None:
    probe = {"after": {split: {"images": 200, "draws": 4, "own": 0.08, "other": 0.08 + gap, "gap": gap,
                               "gap_se": se, "token_nn": 0.1} for split in ("seen", "unseen")}}
    for name, report in (("stage1", {"identity_probe": probe}), ("stage2", {"routing_accuracy": _routing(*routed)}),
                         ("stage2_lambda0", {"routing_accuracy": _routing(*control)})):
        (runs / name).mkdir(parents=True, exist_ok=True)
        (runs / name / "report.json").write_text(json.dumps(report))


def test_guard_passes_learned_runs_and_names_each_figure_that_misses(tmp_path, capsys):
    _write(tmp_path, gap=8e-4, se=1e-4, routed=(0.83, 0.66), control=(0.50, 0.33))
    assert guard_cli.main(["check", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("[guard] ok") == 2 + 4 + 4 and "other bands: 250<=t<500 0.830" in out

    # no identity (gap within noise), a router at chance, and a control that routes as if trained
    _write(tmp_path, gap=1e-4, se=1e-4, routed=(0.55, 0.40), control=(0.83, 0.66))
    assert guard_cli.main(["check", "--runs", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("[guard] FAIL") == 2 + 4 + 4
    assert "stage 1 identity gap, seen identities, in standard errors" in captured.err
    assert ("required >= 3" in captured.err
            and "control (lambda = 0) routing accuracy t<250, unseen/3faces" in captured.err)
    assert "required in [0.253, 0.413]" in captured.err

    _write(tmp_path, gap=8e-4, se=1e-4, routed=(0.83, 0.66), control=(0.50, 0.33))
    assert guard_cli.main(["check", "--runs", str(tmp_path), "--min-routing-margin", "0.4"]) == 1  # thresholds apply


def test_guard_without_a_report_names_the_file(tmp_path):
    _write(tmp_path, gap=8e-4, se=1e-4, routed=(0.83, 0.66), control=(0.50, 0.33))
    (tmp_path / "stage2_lambda0" / "report.json").unlink()
    with pytest.raises(FileNotFoundError, match="stage2_lambda0/report.json"):
        guard_cli.main(["check", "--runs", str(tmp_path)])


def test_control_config_is_stage2_without_routing_loss_in_its_own_folder():
    stage2 = resolve_config(ROOT / "configs" / "tiny" / "stage2.yaml")
    control = guard.control_config(stage2, "stage2_lambda0")
    assert control["model"]["routing_lambda"] == 0.0 and stage2["model"]["routing_lambda"] > 0
    assert control["trainer"]["logger"]["init_args"]["name"] == "stage2_lambda0"
    dirs = [cb["init_args"]["dirpath"] for cb in control["trainer"]["callbacks"]
            if "dirpath" in cb.get("init_args", {})]
    assert dirs and all(d.startswith("runs/tiny/stage2_lambda0/") for d in dirs)
    # everything else is stage 2's: same start, data, steps and report splits
    for key in ("init_from", "lr", "stage"):
        assert control["model"][key] == stage2["model"][key]
    assert control["data"] == stage2["data"] and control["trainer"]["max_steps"] == stage2["trainer"]["max_steps"]
    # the routing report skips the "before" figures, which are stage 2's (same start); "after" stays
    reports = [cb for cb in control["trainer"]["callbacks"] if cb["class_path"].endswith(".RoutingAccuracyReport")]
    assert len(reports) == 1 and reports[0]["init_args"]["measure_before"] is False
    assert reports[0]["init_args"]["splits"] == next(cb for cb in stage2["trainer"]["callbacks"]
                                                     if cb["class_path"].endswith(".RoutingAccuracyReport"))[
                                                         "init_args"]["splits"]


def test_seed_config_moves_every_stage_and_the_hand_over_to_its_own_folder():
    stage1 = resolve_config(ROOT / "configs" / "tiny" / "stage1.yaml")
    stage2 = resolve_config(ROOT / "configs" / "tiny" / "stage2.yaml")
    s1, s2 = (guard.seed_config(c, 7, Path("runs/seed7")) for c in (stage1, stage2))
    for cfg, orig in ((s1, stage1), (s2, stage2)):
        seeds = [cb["init_args"]["seed"] for cb in cfg["trainer"]["callbacks"]
                 if cb["class_path"].endswith("ResumableRNG")]
        assert seeds == [7] and orig is not cfg
        assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "runs/seed7"
        dirs = [cb["init_args"]["dirpath"] for cb in cfg["trainer"]["callbacks"]
                if "dirpath" in cb.get("init_args", {})]
        name = cfg["trainer"]["logger"]["init_args"]["name"]
        assert dirs and all(d.startswith(f"runs/seed7/{name}/") for d in dirs)
        assert cfg["seed_everything"] == 7 and cfg["data"]["seed"] == 7 and orig["data"].get("seed", 0) == 0
        assert ({k: v for k, v in cfg["data"].items() if k != "seed"}
                == {k: v for k, v in orig["data"].items() if k != "seed"})
    assert s2["model"]["init_from"] == "runs/seed7/stage1/checkpoints/last.ckpt"  # stage 2 starts from seed 7's stage 1
    assert stage2["model"]["init_from"] == "runs/tiny/stage1/checkpoints/last.ckpt"  # the original is untouched
    control = guard.control_config(s2, "stage2_lambda0")
    assert control["model"]["routing_lambda"] == 0.0 and control["model"]["init_from"] == s2["model"]["init_from"]
    assert all(cb["init_args"]["dirpath"].startswith("runs/seed7/stage2_lambda0/")
               for cb in control["trainer"]["callbacks"] if "dirpath" in cb.get("init_args", {}))
