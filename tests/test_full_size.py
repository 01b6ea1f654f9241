"""`make full-size`'s code (src/benchmarks/full_size.py) on the tiny architectures: both stage configs, generate and
export end to end, and the pieces that read its figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.benchmarks import full_size
from src.cli import full_size as cli

STEPS = ["write components", "write shards", "stage 1", "stage 2", "generate", "export float32", "export float16"]


@pytest.mark.slow  # ~2 min here: seven processes, each importing torch, diffusers and Lightning
def test_tiny_run_trains_both_stages_generates_and_exports(tmp_path: Path) -> None:
    out = tmp_path / "fs"
    assert cli.main(["--arch", "tiny", "--out", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["step"]: r for r in report["rows"]}
    assert list(rows) == STEPS
    for r in report["rows"]:
        assert r["error"] is None and r["wall_s"] > 0, r
    for name in STEPS[2:]:  # each command's own process
        assert rows[name]["peak_rss_gb"] > 0
    for stage in ("stage 1", "stage 2"):
        assert rows[stage]["train_step_s"] > 0 and rows[stage]["trainable_params"] > 0
        assert (out / rows[stage]["log_file"]).is_file()
    assert (out / "runs/stage2/checkpoints/last.ckpt").is_file()
    assert (out / "generated/image_00.png").is_file()
    for dtype in ("float32", "float16"):
        for name in ("uniportrait-faceid_sd15.bin", "uniportrait-router_sd15.bin"):
            assert (out / "export" / dtype / name).is_file()
            assert rows[f"export {dtype}"]["outputs"][f"export/{dtype}/{name}"] > 0
    # the components are in the formats the stage configs load: the tokenizer written offline, the model files
    base = out / "components" / "base"
    for sub in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        assert any((base / sub).iterdir()), sub
    assert (out / "components" / full_size.CLIP_FILE).is_file() and (out / "components" / full_size.FACE_FILE).is_file()


def test_a_complete_folder_is_kept_and_one_of_another_arch_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "components"
    folder.mkdir()
    (folder / full_size.DONE).write_text(json.dumps({"arch": "sd15"}))

    def never(*args) -> None:  # a kept folder is not written again
        raise AssertionError("wrote a complete folder again")

    step = full_size.ensure_written("write components", folder, {"arch": "sd15"}, never)
    assert step.wall_s > 0 and "kept" in step.note and step.peak_rss_gb is None
    with pytest.raises(ValueError, match=r"\.complete.*'sd15'.*another --out"):
        full_size.ensure_written("write components", folder, {"arch": "tiny"}, never)
    assert (folder / full_size.DONE).is_file()  # never deleted


def test_step_time_and_trainable_parameters_are_read_from_the_run_files(tmp_path: Path) -> None:
    profile = tmp_path / "fit-stage1.txt"
    profile.write_text("FIT Profiler Report\n"
                       "|  Action                  \t|  Mean duration (s)\t|  Num calls      \t|  Total time (s) \t|\n"
                       "|  run_training_batch_x    \t|  9.0              \t|  2              \t|  18.0           \t|\n"
                       "|  run_training_batch      \t|  47.25            \t|  2              \t|  94.5           \t|\n")
    assert full_size.mean_step_seconds([profile]) == 47.25
    assert full_size.mean_step_seconds([]) is None
    log = tmp_path / "stage_1.log"
    log.write_text("INFO src.module: stage 1 trainable parameters: id_embedding=1,000 (lr 1.00e-05), "
                   "lora_single_id=234 (lr 1.00e-05); total 1,234\nEpoch 0\n")
    assert full_size.trainable_parameters(log) == 1234


def test_training_commands_override_only_paths_and_run_settings(tmp_path: Path) -> None:
    """At SD1.5 size the stage configs' architecture is left as it is: no model override but the paths and init_from."""
    cmd = full_size.train_command(2, full_size.SD15, tmp_path, threads=2, steps=2, resolution=512)
    assert cmd[3:6] == ["fit", "--config", str(full_size.STAGE_CONFIGS[2])]
    model = sorted(a.split("=")[0] for a in cmd if a.startswith("--model."))
    assert model == ["--model.components.base_model", "--model.components.clip_checkpoint",
                     "--model.components.face_backbone", "--model.init_from"]
    assert f"--model.init_from={tmp_path}/runs/stage1/checkpoints/last.ckpt" in cmd
    assert {"--trainer.max_steps=2", "--data.batch_size=1", "--data.num_workers=0", "--torch_threads=2",
            "--trainer.precision=32-true"} <= set(cmd)
    assert not any(a.startswith("--data.resolution") for a in cmd)
