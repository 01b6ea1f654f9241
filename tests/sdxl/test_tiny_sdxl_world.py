"""The tiny SDXL world's UNet is pretrained like the SD1.5 world's parts and ships in assets/tiny-sdxl:
`make tiny-sdxl` copies it when its options are the ones it was made with, pretrains otherwise."""
from __future__ import annotations

import inspect
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from datamodules.synthetic.dataset import SyntheticConfig
from src.models import presets
from src.models.conditioning import added_cond_kwargs, compute_time_ids
from src.tiny import architectures, sdxl
from src.tiny import assets as tiny_assets
from src.tiny.sdxl import SDXL_ASSETS, SDXL_COMPANIONS, SDXL_PRETRAINED_FILES, VAE_FILE, build_sdxl
from tests.sdxl.conftest import SDXL_BUILD


def _save(world: Path, assets: Path) -> dict:
    return tiny_assets.save_assets(world, assets, "test", files=SDXL_PRETRAINED_FILES, companions=SDXL_COMPANIONS,
                                   figures=("unet_loss",))


def test_the_default_sdxl_build_uses_the_shipped_unet_and_it_fits_the_tiny_architecture():
    """What `make tiny-sdxl` asks for (the default SD1.5 world's data and shipped VAE, build_sdxl's defaults)
    is what assets/tiny-sdxl was made with, and the shipped UNet loads strictly into `tiny_sdxl_unet`."""
    defaults = {k: v.default for k, v in inspect.signature(build_sdxl).parameters.items()}
    sd15 = json.loads((tiny_assets.ASSETS / "manifest.json").read_text())
    options = sdxl.sdxl_options(asdict(SyntheticConfig(seed=0)), sd15["sha256"][VAE_FILE], defaults["seed"],
                                defaults["unet_steps"], defaults["pretrain_images"])
    manifest = tiny_assets.shipped_weights(SDXL_ASSETS, options, SDXL_PRETRAINED_FILES)
    assert manifest is not None, f"{SDXL_ASSETS}/manifest.json was made with other options: run make tiny-sdxl-assets"
    assert set(manifest["sha256"]) == set(SDXL_PRETRAINED_FILES)
    unet = architectures.tiny_sdxl_unet(sample_size=SyntheticConfig().size // 4)
    unet.load_state_dict(load_file(SDXL_ASSETS / "base/unet/diffusion_pytorch_model.safetensors"), strict=True)
    shipped_config = json.loads((SDXL_ASSETS / "base/unet/config.json").read_text())
    ours = json.loads(json.dumps(dict(unet.config)))
    assert {k: v for k, v in shipped_config.items() if not k.startswith("_")} == \
        {k: v for k, v in ours.items() if not k.startswith("_")}


def test_the_shipped_sdxl_unet_denoises_better_than_a_fresh_one():
    """Pretrained, not freshly initialised: on the same noisy latents (random text states and pooled
    embedding, uncropped time_ids) it predicts the noise better than the same architecture at its init."""
    torch.manual_seed(0)
    shipped = UNet2DConditionModel.from_pretrained(SDXL_ASSETS / "base/unet").eval()
    fresh = architectures.tiny_sdxl_unet(sample_size=shipped.config.sample_size).eval()
    vae = AutoencoderKL.from_pretrained(tiny_assets.ASSETS / "base/vae").eval()
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, size=64,
                                             mode="bilinear", align_corners=False)  # smooth colour fields
    with torch.no_grad():
        lat = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=g)
        t = torch.full((8,), 500)
        noisy = presets.sd15_scheduler().add_noise(lat, noise, t)
        text = torch.randn(8, 77, shipped.config.cross_attention_dim, generator=g) * 0.1
        size = torch.tensor([64, 64])
        added = added_cond_kwargs(torch.randn(8, architectures.TINY_SDXL_POOLED, generator=g) * 0.1,
                                  compute_time_ids(size.expand(8, 2), torch.zeros(8, 2, dtype=torch.long), size))
        err = {name: torch.nn.functional.mse_loss(
            m(noisy, t, encoder_hidden_states=text, added_cond_kwargs=added).sample, noise).item()
            for name, m in (("shipped", shipped), ("fresh", fresh))}
    assert err["shipped"] < 0.5 * err["fresh"], err


def test_an_sdxl_build_with_the_assets_options_copies_them_without_pretraining(tiny_world, sdxl_world, tmp_path,
                                                                               monkeypatch):
    assets = tmp_path / "assets"
    manifest = _save(sdxl_world, assets)
    assert manifest["options"]["unet_steps"] == SDXL_BUILD["unet_steps"]
    assert set(manifest["companions"]) == set(SDXL_COMPANIONS)

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained although matching shipped weights were given")

    monkeypatch.setattr(sdxl, "pretrain_unet", refuse)
    out = build_sdxl(tmp_path / "world", sd15_world=tiny_world, **SDXL_BUILD, assets=assets)
    for rel in (*SDXL_PRETRAINED_FILES, *SDXL_COMPANIONS, "base/model_index.json"):
        assert (out / rel).read_bytes() == (sdxl_world / rel).read_bytes(), rel
    report = json.loads((out / "tiny_report.json").read_text())
    assert report["pretrained"]["source"] == str(assets)
    assert report["unet_loss"] == json.loads((sdxl_world / "tiny_report.json").read_text())["unet_loss"]
    with pytest.raises(ValueError, match="not pretrained in this folder"):  # copies are not re-shipped
        _save(out, tmp_path / "again")


def test_an_sdxl_build_with_other_options_pretrains_and_says_which_differ(tiny_world, sdxl_world, tmp_path,
                                                                          monkeypatch, caplog):
    assets = tmp_path / "assets"
    _save(sdxl_world, assets)
    calls = []
    monkeypatch.setattr(sdxl, "pretrain_unet", lambda *a, **k: calls.append(a[-1]) or 0.5)
    with caplog.at_level(logging.INFO, logger="src.tiny"):
        build_sdxl(tmp_path / "world", sd15_world=tiny_world, **dict(SDXL_BUILD, unet_steps=3), assets=assets)
    assert calls == [3] and "unet_steps" in caplog.text and "pretraining the tiny parts here" in caplog.text
    shutil.rmtree(tmp_path / "world")
    build_sdxl(tmp_path / "world", sd15_world=tiny_world, **SDXL_BUILD, assets=assets, pretrain=True)
    assert calls == [3, SDXL_BUILD["unet_steps"]]  # asked for explicitly


def test_the_sdxl_world_needs_a_built_sd15_world_and_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="build the SD1.5 tiny world first"):
        build_sdxl(tmp_path / "world", sd15_world=tmp_path / "nothing")
