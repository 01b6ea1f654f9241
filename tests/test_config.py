"""Config composition (src/config.py): inheritance, named callbacks, interpolation, and errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from src.config import resolve_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _classes(cfg: dict) -> list[str]:
    return [cb["class_path"].rsplit(".", 1)[-1] for cb in cfg["trainer"]["callbacks"]]


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_named_callbacks_become_a_list_in_order_with_nulls_dropped():
    stage1, stage2 = resolve_config(CONFIGS / "stage1.yaml"), resolve_config(CONFIGS / "stage2.yaml")
    tiny1, tiny2 = resolve_config(CONFIGS / "tiny" / "stage1.yaml"), resolve_config(CONFIGS / "tiny" / "stage2.yaml")
    assert _classes(stage2) == _classes(stage1) + ["RoutingMapLogger"]  # added at the end, the rest kept in order
    assert "LearningRateMonitor" in _classes(stage1) and "LearningRateMonitor" not in _classes(tiny1)  # null drops it
    assert _classes(tiny1)[-1] == "IdentityProbe"
    assert "IdentityProbe" not in _classes(tiny2) and _classes(tiny2)[-2:] == ["RoutingMapLogger",
                                                                               "RoutingAccuracyReport"]
    # a changed argument merges into the inherited callback: the rest of its arguments stay
    ckpt1 = next(cb for cb in stage1["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint"))
    tiny_ckpt = next(cb for cb in tiny1["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint"))
    assert tiny_ckpt["init_args"]["every_n_train_steps"] != ckpt1["init_args"]["every_n_train_steps"]
    assert tiny_ckpt["init_args"]["save_top_k"] == ckpt1["init_args"]["save_top_k"]


def test_interpolations_resolve_against_the_merged_config(tmp_path):
    """Checkpoints follow the logger's folder, the schedule the stage's own max_steps, in a child config too."""
    tiny2 = resolve_config(CONFIGS / "tiny" / "stage2.yaml")
    dirs = {cb["init_args"]["dirpath"] for cb in tiny2["trainer"]["callbacks"] if "dirpath" in cb.get("init_args", {})}
    assert dirs == {"runs/tiny/stage2/checkpoints"}
    assert tiny2["model"]["lr_scheduler"]["init_args"]["total_steps"] == tiny2["trainer"]["max_steps"]
    child = _write(tmp_path / "short.yaml", {"inherits": str(CONFIGS / "tiny" / "stage2.yaml"),
                                             "trainer": {"max_steps": 300, "logger": {"init_args": {"name": "short"}}}})
    cfg = resolve_config(child)
    assert cfg["model"]["lr_scheduler"]["init_args"]["total_steps"] == 300
    dirs = {cb["init_args"]["dirpath"] for cb in cfg["trainer"]["callbacks"] if "dirpath" in cb.get("init_args", {})}
    assert dirs == {"runs/tiny/short/checkpoints"}


def test_a_callback_without_class_path_is_an_error_naming_it_and_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"inherits": str(CONFIGS / "stage1.yaml"),
                                         "trainer": {"callbacks": {"my_probe": {"init_args": {"every": 3}}}}})
    with pytest.raises(ValueError, match=r"bad\.yaml.*trainer\.callbacks\.my_probe.*class_path"):
        resolve_config(bad)


def test_a_list_of_callbacks_over_named_ones_is_an_error_naming_both_files(tmp_path):
    bad = _write(tmp_path / "list.yaml", {"inherits": str(CONFIGS / "stage1.yaml"),
                                          "trainer": {"callbacks": [{"class_path": "a.B"}]}})
    with pytest.raises(ValueError, match=r"list\.yaml.*stage1\.yaml"):
        resolve_config(bad)


def test_an_unresolvable_interpolation_names_the_key(tmp_path):
    bad = _write(tmp_path / "interp.yaml", {"inherits": str(CONFIGS / "stage1.yaml"),
                                            "model": {"lr": "${trainer.no_such_key}"}})
    with pytest.raises(ValueError, match=r"interp\.yaml.*no_such_key"):
        resolve_config(bad)


def test_inheritance_cycles_name_the_files(tmp_path):
    _write(tmp_path / "a.yaml", {"inherits": "b.yaml"})
    _write(tmp_path / "b.yaml", {"inherits": "a.yaml"})
    with pytest.raises(ValueError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        resolve_config(tmp_path / "a.yaml")


def test_a_child_that_changes_a_class_path_starts_from_its_own_arguments(tmp_path):
    """stage1.yaml's optimizer is AdamW with weight_decay and fused: a child switching to RAdam must not inherit
    them (RAdam refuses `fused`; Adam would read weight_decay as L2); a child keeping AdamW keeps them."""
    base = resolve_config(CONFIGS / "stage1.yaml")["model"]["optimizer"]
    assert base["class_path"] == "torch.optim.AdamW" and "fused" in base["init_args"]
    radam = _write(tmp_path / "radam.yaml", {"inherits": str(CONFIGS / "stage1.yaml"), "model": {"optimizer": {
        "class_path": "torch.optim.RAdam", "init_args": {"betas": [0.9, 0.99]}}}})
    assert resolve_config(radam)["model"]["optimizer"] == {"class_path": "torch.optim.RAdam",
                                                           "init_args": {"betas": [0.9, 0.99]}}
    same = _write(tmp_path / "same.yaml", {"inherits": str(CONFIGS / "stage1.yaml"), "model": {"optimizer": {
        "class_path": "torch.optim.AdamW", "init_args": {"betas": [0.9, 0.99]}}}})
    assert resolve_config(same)["model"]["optimizer"]["init_args"] == {**base["init_args"], "betas": [0.9, 0.99]}


def test_the_short_config_flag_resolves_inheritance_too(tmp_path):
    from src.config import expand_config_args

    for args in (["-c", str(CONFIGS / "stage2.yaml")], [f"-c={CONFIGS / 'stage2.yaml'}"]):
        out = expand_config_args(["fit", *args], str(tmp_path))
        assert out[:2] == ["fit", "--config"]
        assert yaml.safe_load(Path(out[2]).read_text()) == resolve_config(CONFIGS / "stage2.yaml")
