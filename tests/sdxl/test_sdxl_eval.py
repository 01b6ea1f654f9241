"""Evaluation on SDXL: the IdentityMetrics callback samples and scores through the SDXL pipeline in a short
fit of each stage, and `python -m src.evaluate` takes an SDXL base model (`--base-model`) with the SD1.5 tiny
world's identities and encoders (the tiny SDXL world's are copies of them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from src.cli.train import main as train_main
from tests.eval.test_evaluate import run_eval
from tests.eval.test_id_metrics_callback import (
    CONFIGS,
    assert_multi_in_range,
    fit_with_metrics,
    logged_tags,
    multi_values,
)
from tests.helpers import SMALL_MODEL, tiny_args


@pytest.fixture(scope="module")
def sdxl_fits(tiny_world, sdxl_world, tmp_path_factory) -> dict:
    """Two steps of stage 1, then of stage 2 from it, through the real CLI on the tiny SDXL base model, with
    IdentityMetrics sampling every 2 steps."""
    root = tmp_path_factory.mktemp("sdxl_fits")
    base = [f"--model.components.base_model={sdxl_world / 'base'}"]
    s1 = fit_with_metrics(tiny_world, root / "s1", 1, 2, base)
    last = root / "s1" / "ckpt" / "last.ckpt"
    s2 = fit_with_metrics(tiny_world, root / "s2", 2, 2, [*base, f"--model.init_from={last}"])
    return {"s1": s1, "s2": s2, "s1_ckpt": last, "stage2_ckpt": root / "s2" / "ckpt" / "last.ckpt"}


def _metrics(cli):
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == "IdentityMetrics").last


def test_identity_metrics_sample_and_score_through_sdxl(sdxl_fits):
    s1, s2 = sdxl_fits["s1"], sdxl_fits["s2"]
    assert s1.model.text_encoder_2 is not None and s2.model.text_encoder_2 is not None  # on SDXL, both stages
    last = _metrics(s1)
    assert {"val_id/face_sim", "val_id/no_face_rate", "val_id/clip_i_own_tower"} <= set(last)
    assert 0.0 <= last["val_id/face_sim"] <= 1.0
    last2 = _metrics(s2)
    acc = last2["val_id/routing_acc"]
    assert acc != acc or 0.0 <= acc <= 1.0  # NaN only when no face position was counted
    assert_multi_in_range(multi_values(last2), num_images=2)


def test_evaluate_takes_an_sdxl_base_model(tiny_world, sdxl_world, sdxl_fits, tmp_path, capsys):
    """The multi-person splits and the single-ID protocol on an SDXL stage-2 checkpoint: routed, scored,
    images at the SDXL UNet's native size; the same checkpoint on the SD1.5 base model is refused by name."""
    out = tmp_path / "eval"
    res = run_eval(tiny_world, sdxl_fits["stage2_ckpt"], out, "--base-model", str(sdxl_world / "base"),
                   "--protocol", "both", "--identities", "3", "--people", "2", "--pairs", "1", "--prompts", "1",
                   "--multi-prompts", "1", "--images", "1")
    split = res["multi"]["2"]
    assert split["mode"] == "routed" and split["num_images"] == 1
    assert 0.0 <= split["face_sim"] <= 100.0
    assert 0.0 <= res["single"]["face_sim"] <= 100.0 and res["single"]["num_images"] == 3
    assert json.loads((out / "results.json").read_text())["config"]["base_model"] == str(sdxl_world / "base")
    images = [p for p in Path(res["images_dir"]).rglob("*.png")]
    assert images and all(Image.open(p).size == (64, 64) for p in images)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # an SDXL checkpoint on the SD1.5 base model: a named error, exit 2
        run_eval(tiny_world, sdxl_fits["stage2_ckpt"], tmp_path / "wrong", "--protocol", "multi", "--identities",
                 "3", "--people", "2", "--pairs", "1", "--multi-prompts", "1", "--images", "1")
    err = capsys.readouterr().err
    assert "sdxl" in err.lower() and "sd15" in err.lower().replace("sd1.5", "sd15"), err


def test_the_callbacks_take_non_square_bucketed_batches_on_sdxl(tiny_world, sdxl_world, sdxl_fits, tmp_path):
    """Stage 2 on SDXL with one 48x64 aspect-ratio bucket (every training and validation image cropped to a
    landscape frame): the routing-map panel, routing accuracy and IdentityMetrics' sampled images work at
    that shape."""
    out = tmp_path / "bucketed"
    callbacks = [
        {"class_path": "callbacks.routing_maps.RoutingMapLogger", "init_args": {"every_n_steps": 2, "num_images": 2}},
        {"class_path": "callbacks.id_metrics.IdentityMetrics",
         "init_args": {"every_n_steps": 2, "num_images": 2, "num_inference_steps": 2, "calibration_renders": 2}},
    ]
    cli = train_main(["fit", f"--config={CONFIGS / 'tiny' / 'stage2.yaml'}", *tiny_args(tiny_world, multi=True),
                      *SMALL_MODEL, f"--model.components.base_model={sdxl_world / 'base'}",
                      f"--model.init_from={sdxl_fits['s1_ckpt']}", "--data.buckets=[[48, 64]]",
                      f"--trainer.default_root_dir={out}", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
                      f"--trainer.callbacks={json.dumps(callbacks)}",
                      '--trainer.logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger", '
                      f'"init_args": {{"save_dir": "{out}", "name": "tb"}}}}'])
    batch = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RoutingMapLogger")._batch
    assert tuple(batch["image"].shape[-2:]) == (48, 64)
    assert any(t.startswith("routing/acc_") for t in logged_tags(out))
    assert "routing/maps" in logged_tags(out, "images")
    last = _metrics(cli)
    assert_multi_in_range(multi_values(last), num_images=2)
