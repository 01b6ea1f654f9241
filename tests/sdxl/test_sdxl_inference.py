"""Inference and export on the tiny SDXL world (src/tiny/sdxl.py, written into a temporary folder): stage-1 and
stage-2 checkpoints trained here for one step each generate through diffusers' StableDiffusionXLPipeline, export
to the SDXL adapter layout (src/inference/arch.py) and load back bit-exactly; `python -m src.generate` runs on an
SDXL directory; SD1.5 weights meet an SDXL base model (and the reverse) with an error naming both."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open

from src.inference import convert
from src.inference.loading import export_checkpoint, load_pipeline
from src.inference.pipeline import Identity, UniPortraitPipeline
from src.models import adapters
from src.tiny import tiny_components
from tests.helpers import write_components_yaml
from tests.inference.helpers import PROMPT, image_array, random_crops, run_pipeline, tiny_embedding_for, write_released
from tests.sdxl.test_sdxl_module import make_module, perturb_face_values, sized
from tests.test_module import batch_from

STEPS = 2
ID_A = Identity.from_crops(random_crops(1, seed=1))
ID_B = Identity.from_crops(random_crops(1, seed=2))


def _train_step(module, batch: dict) -> None:
    """One optimizer step of `module` (its own optimizer) on `batch`."""
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    out = module.train().shared_step(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    opt.step()
    opt.zero_grad()
    module.eval()


def _save(module, path: Path) -> Path:
    """What Lightning's ModelCheckpoint writes for the module (hyper-parameters + on_save_checkpoint)."""
    ckpt: dict = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(sdxl_world, tiny_world, tmp_path_factory) -> dict[int, Path]:
    """Stage-1 and stage-2 checkpoints trained one step each on the tiny SDXL world (stage 2 from stage 1);
    the face-ID values are perturbed first (they start at zero, where the identity has no effect)."""
    root = tmp_path_factory.mktemp("sdxl_ckpt")
    m1 = make_module(sdxl_world)
    perturb_face_values(m1)
    _train_step(m1, sized(batch_from(tiny_world, n=2), [[96, 96], [80, 64]], [[4, 4], [0, 8]]))
    stage1 = _save(m1, root / "stage1.ckpt")
    m2 = make_module(sdxl_world, stage=2, init_from=str(stage1))
    _train_step(m2, sized(batch_from(tiny_world, multi=True, n=2), [[64, 64]] * 2, [[0, 0]] * 2))
    return {1: stage1, 2: _save(m2, root / "stage2.ckpt")}


def _run(pipe: UniPortraitPipeline, ids: list[Identity], **kw):
    return run_pipeline(pipe, ids, STEPS, **kw)


def _adapter_weights(pipe: UniPortraitPipeline) -> dict[str, torch.Tensor]:
    sd = {f"unet.{k}": v for k, v in adapters.adapter_state_dict(pipe.pipe.unet).items()}
    sd.update({f"identity.embedding.{k}": v for k, v in pipe.identity.embedding.state_dict().items()})
    return sd


# ---------------------------------------------------------------------------------------------- pipeline
def test_a_stage2_checkpoint_generates_through_the_sdxl_pipeline(sdxl_world, checkpoints):
    """from_checkpoint on an SDXL directory: diffusers' SDXL pipeline, the module's saved weights exactly, the
    UNet given SDXL's added conditions for an uncropped image of the asked size, identities that matter, one-hot
    routing maps for two identities, and fused LoRA within rounding of the unfused one."""
    pipe = UniPortraitPipeline.from_checkpoint(tiny_components(sdxl_world), checkpoints[2])
    assert pipe.arch == "sdxl" and isinstance(pipe.pipe, StableDiffusionXLPipeline)
    saved = torch.load(checkpoints[2], weights_only=True)["state_dict"]
    loaded = _adapter_weights(pipe)
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)

    seen = []
    hook = pipe.pipe.unet.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["added_cond_kwargs"]),
                                                    with_kwargs=True)
    try:
        one = _run(pipe, [ID_A], height=64, width=48)
    finally:
        hook.remove()
    assert one.images[0].size == (48, 64) and len(seen) == STEPS
    # guided: [uncond; cond], each an uncropped 64 x 48 image: original (64, 48), crop (0, 0), target (64, 48)
    assert torch.equal(seen[0]["time_ids"], torch.tensor([[64.0, 48, 0, 0, 64, 48]] * 2))
    assert seen[0]["text_embeds"].shape == (2, pipe.components.text_encoder_2.config.projection_dim)

    a, b = _run(pipe, [ID_A]), _run(pipe, [ID_B])
    assert not np.array_equal(image_array(a.images), image_array(b.images))
    assert np.array_equal(image_array(a.images), image_array(_run(pipe, [ID_A]).images))  # deterministic per seed
    two = _run(pipe, [ID_A, ID_B], return_routing_maps=True)
    assert len(two.routing_maps) == len(adapters.faceid_processors(pipe.pipe.unet))
    for m in two.routing_maps:
        assert torch.equal(m.hard.sum(1), torch.ones_like(m.hard.sum(1)))  # one identity per position
    pipe.fuse_lora(True)
    try:
        fused = _run(pipe, [ID_A, ID_B])
    finally:
        pipe.fuse_lora(False)
    assert np.abs(image_array(fused.images) - image_array(two.images)).max() <= 2


def test_the_sdxl_controlnet_pipeline_runs_with_the_adapters(sdxl_world, checkpoints):
    pipe = UniPortraitPipeline.from_checkpoint(tiny_components(sdxl_world), checkpoints[1])
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(tiny_components(sdxl_world).build().unet,  # a plain SDXL UNet
                                           conditioning_embedding_out_channels=(8, 16, 16))
    cn = UniPortraitPipeline.from_components(pipe.components, pipe.identity.embedding, controlnet=controlnet)
    assert isinstance(cn.pipe, StableDiffusionXLControlNetPipeline)
    assert not any(type(p).__name__ == "FaceIDAttnProcessor" for p in controlnet.attn_processors.values())
    control = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    with_id = _run(cn, [ID_A], control_image=control)
    without = _run(cn, [ID_A], control_image=control, faceid_scale=0.0)
    assert with_id.images[0].size == (64, 64)
    assert not np.array_equal(image_array(with_id.images), image_array(without.images))


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("stage", [1, 2])
def test_sdxl_export_reloads_bit_exactly_and_generates_identically(sdxl_world, checkpoints, stage, tmp_path):
    """`python -m src.export` -> uniportrait-{faceid,router}_sdxl.safetensors (without --safetensors) with the
    architecture in the metadata -> from_released (no dim_head given: read from the metadata) has the checkpoint's
    weights exactly and the same images."""
    from src.cli import export

    comps = tiny_components(sdxl_world)
    yaml = write_components_yaml(comps, tmp_path / "c.yaml")
    written = export.main(["--checkpoint", str(checkpoints[stage]), "--components", str(yaml),
                           "--out", str(tmp_path / "out")])
    names = ["uniportrait-faceid_sdxl.safetensors"] + (["uniportrait-router_sdxl.safetensors"] if stage == 2 else [])
    assert [p.name for p in written] == names
    ours = UniPortraitPipeline.from_checkpoint(comps, checkpoints[stage])
    for path, part in zip(written, ("faceid", "router")):
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["uniportrait_arch"] == "sdxl" and meta["part"] == part
        assert meta["cross_attention_dim"] == str(comps.build().unet.config.cross_attention_dim) == "64"
        assert meta["lora_rank"] == "4" and meta["dim_head"] == "16" and meta["num_tokens"] == "16"
        assert all(k.split(".")[0] in ("faceid_proj", "faceid_adapter") for k in keys)
    back = UniPortraitPipeline.from_released(comps, *written)
    assert back.arch == "sdxl"
    got, want = _adapter_weights(back), _adapter_weights(ours)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for ids in ([ID_A], [ID_A, ID_B]) if stage == 2 else ([ID_A],):
        assert np.array_equal(image_array(_run(back, ids).images), image_array(_run(ours, ids).images))


def test_the_safetensors_checkpoint_export_records_sdxl_and_loads_identically(sdxl_world, checkpoints, tmp_path):
    comps = tiny_components(sdxl_world)
    convert.export_checkpoint_safetensors(checkpoints[2], tmp_path / "m.safetensors", arch="sdxl")
    assert convert.read_checkpoint(tmp_path / "m.safetensors").arch == "sdxl"
    back = UniPortraitPipeline.from_checkpoint(comps, tmp_path / "m.safetensors")
    ours = UniPortraitPipeline.from_checkpoint(comps, checkpoints[2])
    got, want = _adapter_weights(back), _adapter_weights(ours)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------- command line
def test_generate_command_on_an_sdxl_directory_writes_images_and_routing_maps(sdxl_world, checkpoints, tmp_path):
    from src.cli import generate

    yaml = write_components_yaml(tiny_components(sdxl_world), tmp_path / "c.yaml")
    crops = []
    for i in range(2):
        crop = ((random_crops(1, seed=10 + i)[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
        crops.append(tmp_path / f"crop{i}.png")
        Image.fromarray(crop.to(torch.uint8).numpy()).save(crops[-1])
    out = tmp_path / "gen"
    generate.main(["--prompt", PROMPT, "--components", str(yaml), "--checkpoint", str(checkpoints[2]),
                   "--face-crop", str(crops[0]), "--face-crop", str(crops[1]), "--steps", str(STEPS),
                   "--routing-maps", "--out", str(out), "--device", "cpu"])
    image = out / "image_00.png"
    assert Image.open(image).size == (64, 64)
    maps = sorted((out / "routing").glob("*.png"))
    n_layers = len(adapters.faceid_processors(UniPortraitPipeline.from_checkpoint(
        tiny_components(sdxl_world), checkpoints[2]).pipe.unet))
    assert len(maps) == n_layers and all(Image.open(m).size == (64, 64) for m in maps)


# ---------------------------------------------------------------------------------------------- mixing architectures
@pytest.fixture(scope="module")
def sd15_weights(tiny_world, tmp_path_factory) -> dict:
    """The SD1.5 tiny world's components with released-layout SD1.5 files for its UNet."""
    comps = tiny_components(tiny_world)
    nets = comps.build()
    fp, rp = write_released(tmp_path_factory.mktemp("sd15_released"), nets.unet, tiny_embedding_for(comps), seed=1)
    return {"components": comps, "faceid": fp, "router": rp}


def _both_named(err: pytest.ExceptionInfo, path: Path) -> None:
    text = str(err.value)
    assert "sd15" in text and "sdxl" in text and str(path) in text, text


def test_sd15_weights_on_an_sdxl_base_model_fail_naming_both(sdxl_world, tiny_world, sd15_weights, tmp_path):
    sdxl = tiny_components(sdxl_world)
    with pytest.raises(ValueError) as err:
        UniPortraitPipeline.from_released(sdxl, sd15_weights["faceid"], sd15_weights["router"], dim_head=16)
    _both_named(err, sd15_weights["faceid"])
    with pytest.raises(ValueError) as err:  # the command path: load_pipeline with a components YAML
        load_pipeline(components=write_components_yaml(sdxl, tmp_path / "c.yaml"),
                      released_faceid=sd15_weights["faceid"])
    _both_named(err, sd15_weights["faceid"])
    # an SD1.5 checkpoint trained here (the module's .ckpt records no architecture): the adapters do not fit
    sd15_ckpt = _save(make_module(tiny_world), tmp_path / "sd15.ckpt")
    with pytest.raises((KeyError, ValueError)) as err:
        UniPortraitPipeline.from_checkpoint(sdxl, sd15_ckpt)
    _both_named(err, sd15_ckpt)
    # its safetensors export records the architecture: fails before any network loads
    convert.export_checkpoint_safetensors(sd15_ckpt, tmp_path / "sd15.safetensors", arch="sd15")
    with pytest.raises(ValueError) as err:
        UniPortraitPipeline.from_checkpoint(sdxl, tmp_path / "sd15.safetensors")
    _both_named(err, tmp_path / "sd15.safetensors")


def test_sdxl_weights_on_an_sd15_base_model_fail_naming_both(sdxl_world, checkpoints, sd15_weights, tmp_path):
    sd15 = sd15_weights["components"]
    exported = export_checkpoint(checkpoints[2], write_components_yaml(tiny_components(sdxl_world),
                                                                       tmp_path / "xl.yaml"), tmp_path / "out")
    with pytest.raises(ValueError) as err:
        UniPortraitPipeline.from_released(sd15, *exported)
    _both_named(err, exported[0])
    with pytest.raises(ValueError) as err:
        load_pipeline(components=write_components_yaml(sd15, tmp_path / "c.yaml"), released_faceid=exported[0],
                      released_router=exported[1])
    _both_named(err, exported[0])
    with pytest.raises((KeyError, ValueError)) as err:  # the module's .ckpt: the adapters do not fit
        UniPortraitPipeline.from_checkpoint(sd15, checkpoints[2])
    _both_named(err, checkpoints[2])
    convert.export_checkpoint_safetensors(checkpoints[2], tmp_path / "xl.safetensors", arch="sdxl")
    with pytest.raises(ValueError) as err:  # recorded architecture: fails before any network loads
        UniPortraitPipeline.from_checkpoint(sd15, tmp_path / "xl.safetensors")
    _both_named(err, tmp_path / "xl.safetensors")


def test_the_base_models_force_zeros_for_empty_prompt_reaches_the_sdxl_pipeline(sdxl_world, checkpoints, tmp_path):
    """model_index.json's `force_zeros_for_empty_prompt` is followed: true (the tiny world, as SDXL base 1.0)
    makes the unconditional branch zeros, false encodes "" instead; under guidance the images differ."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(sdxl_world / "base", base)
    index = json.loads((base / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    (base / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    encoded_comps = tiny_components(sdxl_world)
    encoded_comps.base_model = str(base)
    zeros = UniPortraitPipeline.from_checkpoint(tiny_components(sdxl_world), checkpoints[2])
    encoded = UniPortraitPipeline.from_checkpoint(encoded_comps, checkpoints[2])
    assert zeros.pipe.config.force_zeros_for_empty_prompt is True
    assert encoded.pipe.config.force_zeros_for_empty_prompt is False
    a, b = (image_array(_run(p, [ID_A], guidance_scale=5.0, seed=0).images) for p in (zeros, encoded))
    assert np.abs(a - b).max() > 0
