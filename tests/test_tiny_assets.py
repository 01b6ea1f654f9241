"""The default world's pretrained parts ship in assets/tiny: `make tiny` copies them when its options are
the ones they were made with, pretrains otherwise, and never uses a file the manifest does not vouch for."""
from __future__ import annotations

import inspect
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datamodules.synthetic.dataset import SyntheticConfig
from src.models import presets
from src.models.face_backbone import IRBackbone
from src.tiny import architectures, world
from src.tiny import assets as tiny_assets

SMALL = dict(seed=0, vae_steps=2, unet_steps=2, face_steps=2, pretrain_images=64)  # tests/conftest.py's world


def _no_pretraining(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pretrained although matching shipped weights were given")

    for name in ("pretrain_vae", "pretrain_unet", "pretrain_recognition"):
        monkeypatch.setattr(world, name, refuse)


def _world_with_data(tiny_world: Path, out: Path) -> Path:
    """A new world folder holding `tiny_world`'s rendered data, so build() only has the parts to make."""
    shutil.copytree(tiny_world / "data", out / "data")
    return out


def test_the_default_build_uses_the_shipped_weights_and_they_fit_the_tiny_architectures():
    """What `make tiny` asks for is what assets/tiny was made with; every file is the one the manifest
    vouches for and loads strictly into the architectures src/tiny/architectures.py defines. Changing a default or an
    architecture without `make tiny-assets` fails here, not as a silent 13-minute pretraining."""
    defaults = {k: v.default for k, v in inspect.signature(world.build).parameters.items()}
    options = tiny_assets.pretrain_options(defaults["seed"], asdict(SyntheticConfig(seed=defaults["seed"])),
                                    defaults["vae_steps"], defaults["unet_steps"], defaults["face_steps"],
                                    defaults["pretrain_images"], defaults["face_pooled_weight"])
    manifest = tiny_assets.shipped_weights(tiny_assets.ASSETS, options)
    assert manifest is not None, f"{tiny_assets.ASSETS}/manifest.json was made with other options: run make tiny-assets"
    assert set(manifest["sha256"]) == set(tiny_assets.PRETRAINED_FILES)

    size = SyntheticConfig().size // 4  # latent side of the default 64 px images
    unet = architectures.tiny_unet(sample_size=size)
    unet.load_state_dict(load_file(tiny_assets.ASSETS / "base/unet/diffusion_pytorch_model.safetensors"), strict=True)
    for part, model in (("unet", unet), ("vae", architectures.tiny_vae())):  # head counts, block types, ...
        shipped_config = json.loads((tiny_assets.ASSETS / "base" / part / "config.json").read_text())
        ours = json.loads(json.dumps(dict(model.config)))
        learned = {"scaling_factor"}  # set by the VAE's pretraining from its latents' spread
        assert {k: v for k, v in shipped_config.items() if not k.startswith("_") and k not in learned} == \
            {k: v for k, v in ours.items() if not k.startswith("_") and k not in learned}, part
    architectures.tiny_vae().load_state_dict(
        load_file(tiny_assets.ASSETS / "base/vae/diffusion_pytorch_model.safetensors"), strict=True)
    face = IRBackbone(18, architectures.TINY_FACE_WIDTHS, architectures.TINY_FACE_EMBEDDING)
    face.load_state_dict(load_file(tiny_assets.ASSETS / "face_backbone.safetensors"), strict=True)
    # pretrained, not freshly initialised: the shipped figures say the backbone learned the identities
    assert (manifest["report"]["face_backbone"]["after"]
            > manifest["report"]["face_backbone"]["new_render_accuracy_before"])


def test_a_build_with_the_assets_options_copies_them_without_pretraining(tiny_world, tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    manifest = tiny_assets.save_assets(tiny_world, assets, "test")
    assert manifest["options"]["vae_steps"] == SMALL["vae_steps"]
    _no_pretraining(monkeypatch)
    out = _world_with_data(tiny_world, tmp_path / "world")
    report = world.build(out, **SMALL, assets=assets)

    for rel in (*tiny_assets.PRETRAINED_FILES, tiny_assets.TEXT_ENCODER_FILE):
        assert (out / rel).read_bytes() == (tiny_world / rel).read_bytes(), rel
    first = json.loads((tiny_world / "tiny_report.json").read_text())
    for key in ("face_backbone", "vae_loss", "unet_loss"):
        assert report[key] == first[key]
    assert report["pretrained"]["source"] == str(assets)
    with pytest.raises(ValueError, match="not pretrained in this folder"):  # copies are not re-shipped
        tiny_assets.save_assets(out, tmp_path / "again", "test")


def test_a_build_with_other_options_pretrains_and_says_which_differ(tiny_world, tmp_path, monkeypatch, caplog):
    assets = tmp_path / "assets"
    tiny_assets.save_assets(tiny_world, assets, "test")

    def stop(*args, **kwargs):
        raise RuntimeError("pretraining")

    monkeypatch.setattr(world, "render_identity_crops", stop)  # the face backbone's pretraining starts with it
    out = _world_with_data(tiny_world, tmp_path / "world")
    with caplog.at_level(logging.INFO, logger="src.tiny"), pytest.raises(RuntimeError, match="pretraining"):
        world.build(out, **dict(SMALL, face_steps=3), assets=assets)
    assert "face_steps" in caplog.text and "pretraining the tiny parts here" in caplog.text
    with pytest.raises(RuntimeError, match="pretraining"):  # asked for explicitly
        world.build(out, **SMALL, assets=assets, pretrain=True)


def test_a_shipped_file_that_is_not_the_manifests_is_named(tiny_world, tmp_path):
    assets = tmp_path / "assets"
    tiny_assets.save_assets(tiny_world, assets, "test")
    weights = assets / "face_backbone.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = _world_with_data(tiny_world, tmp_path / "world")
    with pytest.raises(ValueError, match="face_backbone.safetensors: sha256 differs"):
        world.build(out, **SMALL, assets=assets)
    assert not (out / "face_backbone.safetensors").exists()


def test_the_shipped_unet_denoises_better_than_a_fresh_one():
    """The shipped UNet is pretrained: on the same noisy latents it predicts the noise better than the
    same architecture freshly initialised (random text conditioning, so this checks denoising only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    shipped = UNet2DConditionModel.from_pretrained(tiny_assets.ASSETS / "base/unet").eval()
    fresh = architectures.tiny_unet(sample_size=shipped.config.sample_size).eval()
    vae = AutoencoderKL.from_pretrained(tiny_assets.ASSETS / "base/vae").eval()
    scheduler = presets.sd15_scheduler()
    g = torch.Generator().manual_seed(0)
    # smooth images (the VAE's world is smooth renders): low-frequency colour fields, upsampled
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, size=64,
                                             mode="bilinear", align_corners=False)
    with torch.no_grad():
        lat = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=g)
        t = torch.full((8,), 500)
        text = torch.randn(8, 77, shipped.config.cross_attention_dim, generator=g) * 0.1
        noisy = scheduler.add_noise(lat, noise, t)
        err = {name: torch.nn.functional.mse_loss(m(noisy, t, encoder_hidden_states=text).sample, noise).item()
               for name, m in (("shipped", shipped), ("fresh", fresh))}
    assert err["shipped"] < 0.5 * err["fresh"], err


@pytest.mark.parametrize("module", ["src.cli.tiny", "src.cli.tiny_sdxl"])
def test_both_world_builders_refuse_save_assets_without_pretrain(module, capsys):
    """Only weights pretrained here can be shipped: --save-assets alone is a usage error before anything is
    built, in the SD1.5 and the SDXL world's builder alike (src.cli.add_shipped_weight_options)."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--out", "never-built", "--save-assets", "assets-copy"])
    assert exit_info.value.code == 2 and "--save-assets needs --pretrain" in capsys.readouterr().err
    assert not Path("never-built").exists()


def test_the_manifest_records_the_command_that_made_the_weights():
    import argparse

    from src.cli import add_shipped_weight_options, shipped_weight_command

    p = argparse.ArgumentParser()
    add_shipped_weight_options(p, Path("assets/tiny"), "the parts", "tiny-assets")
    argv = ["--pretrain", "--save-assets", "out"]
    args = p.parse_args(argv)
    assert args.assets == Path("assets/tiny") and args.save_assets == Path("out")
    assert shipped_weight_command(p, args, argv, "src.tiny") == "python -m src.tiny --pretrain --save-assets out"
