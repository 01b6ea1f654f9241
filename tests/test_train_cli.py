"""The real CLI (`src.cli.train.main`), as a user runs it: configs, fast_dev_run, resume, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from src.cli.train import main
from src.config import resolve_config
from tests.helpers import SMALL_MODEL, tiny_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def test_every_config_resolves_and_stage_configs_hold_overrides_only():
    assert ALL_CONFIGS, "no configs found"
    for path in ALL_CONFIGS:
        cfg = resolve_config(path)
        assert {"model", "data", "trainer"} <= set(cfg), path
    for stage1_path, stage2_path in ((CONFIGS / "stage1.yaml", CONFIGS / "stage2.yaml"),
                                     (CONFIGS / "tiny" / "stage1.yaml", CONFIGS / "tiny" / "stage2.yaml")):
        stage1, stage2 = (yaml.safe_load(p.read_text()) for p in (stage1_path, stage2_path))
        assert stage2["inherits"] == "stage1.yaml"
        assert resolve_config(stage2_path)["model"]["stage"] == 2 and stage2["data"]["multi_id"] is True
        # overrides only: nothing repeated verbatim from stage 1, in the model section or among the callbacks
        assert "components" not in stage2["model"]
        assert not (set(stage2["model"]) & {k for k, v in stage1["model"].items() if stage2["model"].get(k) == v})
        callbacks1, callbacks2 = stage1["trainer"].get("callbacks", {}), stage2["trainer"].get("callbacks", {})
        assert isinstance(callbacks2, dict), f"{stage2_path}: trainer.callbacks should name its callbacks"
        assert not [k for k, v in callbacks2.items() if callbacks1.get(k) == v], stage2_path
    for name in ("stage1.yaml", "stage2.yaml"):  # SDXL trains in aspect-ratio buckets (README, "SDXL")
        data = resolve_config(CONFIGS / "sdxl" / name)["data"]
        assert data["buckets"] == "sdxl_1024" and data["resolution"] == 1024, name


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_instantiates_on_the_tiny_world(config, tiny_world, tmp_path):
    """Each config builds its model, data module and trainer (paths pointed at the tiny world)."""
    multi = "stage2" in config.name
    args = ["fit", f"--config={config}", *tiny_args(tiny_world, multi=multi), *SMALL_MODEL,
            "--model.init_from=null", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
            "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.resolution=64"]
    # the SD1.5 configs name SD1.5-sized components: point the architecture at the tiny ones
    tiny_cfg = resolve_config(CONFIGS / "tiny" / "stage1.yaml")["model"]["components"]
    args += [f"--model.components.{k}={v}" for k, v in tiny_cfg.items()
             if k not in ("base_model", "clip_checkpoint", "face_backbone")]
    cli = main(args, run=False)
    expected_stage = 2 if multi else 1
    assert cli.model.stage == expected_stage
    assert cli.datamodule.multi_id is multi


def test_missing_weight_path_is_a_clear_error_before_training(tiny_world, tmp_path):
    args = ["fit", f"--config={CONFIGS / 'tiny' / 'stage1.yaml'}", *tiny_args(tiny_world), *SMALL_MODEL,
            f"--model.components.face_backbone={tmp_path / 'nope.bin'}"]
    with pytest.raises(FileNotFoundError, match="face_backbone.*nope.bin"):
        main(args, run=False)


def test_unknown_config_key_is_rejected(tiny_world, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"inherits": str(CONFIGS / "tiny" / "stage1.yaml"), "model": {"lora_rnak": 3}}))
    with pytest.raises(SystemExit):
        main(["fit", f"--config={bad}", *tiny_args(tiny_world)], run=False)
    assert "lora_rnak" in capsys.readouterr().err


def test_wrong_type_is_rejected(tiny_world, capsys):
    with pytest.raises(SystemExit):
        main(["fit", f"--config={CONFIGS / 'tiny' / 'stage1.yaml'}", *tiny_args(tiny_world),
              "--model.lora_rank=big"], run=False)
    assert "lora_rank" in capsys.readouterr().err


def test_fast_dev_run_stage1_through_the_cli(tiny_world, tmp_path, monkeypatch):
    """fast_dev_run=2 takes exactly two optimizer steps on a finite loss; they move every stage-1 trainable
    parameter (ID embedding, face-ID projections, single-ID LoRA) and nothing else: the VAE, text encoder,
    face backbone, CLIP tower and base UNet weights (and their buffers) stay bit-identical."""
    from src.models import adapters
    from src.module import SINGLE, UniPortraitModule

    start: dict[str, torch.Tensor] = {}

    def snapshot(module: UniPortraitModule) -> None:  # the weights right before the first step
        start.update({n: t.detach().clone() for n, t in [*module.named_parameters(), *module.named_buffers()]})

    monkeypatch.setattr(UniPortraitModule, "on_train_start", snapshot)
    cli = main(["fit", f"--config={CONFIGS / 'tiny' / 'stage1.yaml'}", *tiny_args(tiny_world), *SMALL_MODEL,
                "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}"])
    module = cli.model
    assert cli.trainer.global_step == 2
    loss = cli.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss > 0
    assert module.nonfinite_total == 0  # no step was skipped

    unet_trainable = {**adapters.faceid_parameters(module.unet), **adapters.lora_parameters(module.unet, SINGLE)}
    trainable = {id(p) for p in [*module.identity.embedding.parameters(), *unet_trainable.values()]}
    assert any(".lora_B." in n for n in unet_trainable) and any("faceid" in n for n in unet_trainable)
    now = dict([*module.named_parameters(), *module.named_buffers()])
    assert set(now) == set(start)
    moved = {n for n, t in now.items() if not torch.equal(t.detach(), start[n])}
    expected = {n for n, p in module.named_parameters() if id(p) in trainable}
    assert moved == expected, (sorted(moved - expected)[:5], sorted(expected - moved)[:5])
    frozen_prefixes = ("vae.", "text_encoder.", "identity.face.", "identity.clip.")
    assert {n for n in now if n.startswith(frozen_prefixes)} and not {n for n in moved if n.startswith(frozen_prefixes)}


def test_resume_from_last_ckpt_continues_the_step_count(tiny_world, tmp_path):
    common = ["fit", f"--config={CONFIGS / 'tiny' / 'stage1.yaml'}", *tiny_args(tiny_world), *SMALL_MODEL,
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    ckpt_cb = ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
               f'"init_args": {{"dirpath": "{tmp_path}/ckpt", "save_last": true, "every_n_train_steps": 2}}}}]')
    main([*common, ckpt_cb, "--trainer.max_steps=4"])
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # safe load works: plain types only
    assert ckpt["global_step"] == 4 and ckpt["uniportrait"]["stage"] == 1
    cli = main([*common, ckpt_cb, "--trainer.max_steps=6", f"--ckpt_path={last}"])
    assert cli.trainer.global_step == 6


def test_torch_threads_sets_the_training_process_threads_and_rejects_zero(tiny_world, capsys):
    args = ["fit", f"--config={CONFIGS / 'tiny' / 'stage1.yaml'}", *tiny_args(tiny_world), *SMALL_MODEL]
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    try:
        main([*args, f"--torch_threads={want}"], run=False)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    main([*args, "--torch_threads=null"], run=False)  # unset (the tiny configs set 2): the count stays
    assert torch.get_num_threads() == before
    with pytest.raises(SystemExit):
        main([*args, "--torch_threads=0"], run=False)
    assert "torch_threads" in capsys.readouterr().err
