"""UniPortraitPipeline on a tiny world (64 px, 3 steps, CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from PIL import Image

from src.faces import NoFaceError
from src.inference import convert
from src.inference.pipeline import Identity, UniPortraitPipeline, make_scheduler
from src.models import adapters
from src.models.faceid_attention import FaceIDAttnProcessor
from tests.inference.helpers import (  # noqa: F401 (one_thread: a fixture)
    PROMPT,
    RANK,
    image_array,
    one_thread,
    random_crops,
    run_pipeline,
    tiny_embedding_for,
    write_released,
    write_tiny_world,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tiny_world")
    paths = write_tiny_world(root)
    nets = paths.build()
    fp, rp = write_released(root / "released", nets.unet, tiny_embedding_for(paths), seed=1)
    return {"paths": paths, "faceid": fp, "router": rp, "root": root}


@pytest.fixture(scope="module")
def pipe(world: dict) -> UniPortraitPipeline:
    return UniPortraitPipeline.from_released(world["paths"], world["faceid"], world["router"], dim_head=16)


def _run(pipe: UniPortraitPipeline, ids: list[Identity], **kw):
    return run_pipeline(pipe, ids, STEPS, **kw)


ID_A = Identity.from_crops(random_crops(1, seed=1))
ID_B = Identity.from_crops(random_crops(1, seed=2))


def test_single_id_generation_depends_on_the_identity(pipe: UniPortraitPipeline) -> None:
    out = _run(pipe, [ID_A], num_images=2)
    assert len(out.images) == 2 and out.images[0].size == (64, 64) and out.routing_maps is None
    again = _run(pipe, [ID_A], num_images=2)
    other = _run(pipe, [ID_B], num_images=2)
    assert np.array_equal(image_array(out.images), image_array(again.images))  # seeded
    assert not np.array_equal(image_array(out.images), image_array(other.images))  # the identity reaches the image


def test_faceid_scale_zero_without_lora_equals_plain_stable_diffusion(world: dict, pipe: UniPortraitPipeline) -> None:
    ours = _run(pipe, [ID_A], faceid_scale=0.0, lora_scale=0.0)
    nets = world["paths"].build()  # a fresh UNet without any adapter
    plain = StableDiffusionPipeline(
        vae=nets.vae, text_encoder=nets.text_encoder, tokenizer=nets.tokenizer, unet=nets.unet,
        scheduler=make_scheduler("ddim", nets.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    plain.set_progress_bar_config(disable=True)
    ref = plain(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(image_array(ours.images), image_array(ref))
    with_lora = _run(pipe, [ID_A], faceid_scale=0.0)  # the single-ID LoRA alone changes the output
    assert not np.array_equal(image_array(with_lora.images), image_array(ref))


def test_multi_reference_runs_and_uses_every_reference(pipe: UniPortraitPipeline) -> None:
    two = Identity.from_crops(torch.cat([random_crops(1, seed=1), random_crops(1, seed=5)]))
    assert two.crops[0].shape[0] == 2
    t_one, t_two = pipe.identity_tokens(ID_A, 0.1), pipe.identity_tokens(two, 0.1)
    assert t_two.shape == t_one.shape == (1, 16, 64)
    assert not torch.allclose(t_one, t_two)
    out = _run(pipe, [two])
    assert len(out.images) == 1


def test_interpolation_weight_zero_is_the_identity_and_one_is_the_partner(pipe: UniPortraitPipeline) -> None:
    mixed0 = Identity(crops=ID_A.crops, mix=[(ID_B, 0.0)])
    mixed1 = Identity(crops=ID_A.crops, mix=[(ID_B, 1.0)])
    half = Identity(crops=ID_A.crops, mix=[(ID_B, 0.5)])
    a, b = pipe.identity_tokens(ID_A, 0.1), pipe.identity_tokens(ID_B, 0.1)
    assert torch.equal(pipe.identity_tokens(mixed0, 0.1), a)
    assert torch.equal(pipe.identity_tokens(mixed1, 0.1), b)
    torch.testing.assert_close(pipe.identity_tokens(half, 0.1), 0.5 * a + 0.5 * b)
    assert np.array_equal(image_array(_run(pipe, [mixed0]).images), image_array(_run(pipe, [ID_A]).images))
    assert np.array_equal(image_array(_run(pipe, [mixed1]).images), image_array(_run(pipe, [ID_B]).images))


def test_identity_tokens_are_computed_once_per_call(pipe: UniPortraitPipeline) -> None:
    calls = []
    handle = pipe.identity.embedding.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        _run(pipe, [ID_A, ID_B], num_images=2)
    finally:
        handle.remove()
    assert len(calls) == 3  # two identities + one unconditional batch, not per step


def test_multi_id_routed_generation_returns_one_hot_maps(pipe: UniPortraitPipeline) -> None:
    out = _run(pipe, [ID_A, ID_B], num_images=2, return_routing_maps=True)
    n_layers = len(adapters.faceid_processors(pipe.pipe.unet))
    assert len(out.images) == 2 and len(out.routing_maps) == n_layers
    used = torch.zeros(2)
    for m in out.routing_maps:
        assert m.hard.shape[:2] == (2, 2) and m.hard.shape[-1] in (16, 8, 4)
        assert set(m.hard.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m.hard.sum(1), torch.ones_like(m.hard.sum(1)))  # exactly one identity per position
        used += m.hard.sum(dim=(0, 2, 3))
    assert (used > 0).all()  # random router weights still route to both identities somewhere
    swapped = _run(pipe, [ID_B, ID_A], num_images=2)
    assert len(swapped.images) == 2


def test_masked_multi_id_generation(pipe: UniPortraitPipeline) -> None:
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    out = _run(pipe, [ID_A, ID_B], masks=masks, return_routing_maps=True)
    (m,) = out.routing_maps
    assert m.name == "explicit_masks" and m.hard.shape == (1, 2, 16, 16)
    assert torch.equal(m.hard[0, 0, :, :8], torch.ones(16, 8)) and torch.equal(m.hard[0, 1, :, 8:], torch.ones(16, 8))
    routed = _run(pipe, [ID_A, ID_B])
    assert not np.array_equal(image_array(out.images), image_array(routed.images))
    with pytest.raises(ValueError, match="masks must be"):
        _run(pipe, [ID_A, ID_B], masks=torch.zeros(3, 64, 64))


def test_several_identities_need_routers_or_masks(world: dict) -> None:
    single_only = UniPortraitPipeline.from_released(world["paths"], world["faceid"], None, dim_head=16)
    with pytest.raises(ValueError, match="routers"):
        _run(single_only, [ID_A, ID_B])
    masks = torch.ones(2, 64, 64)
    assert len(_run(single_only, [ID_A, ID_B], masks=masks).images) == 1


def test_from_checkpoint_reproduces_the_same_weights(world: dict, pipe: UniPortraitPipeline, tmp_path: Path) -> None:
    state = {f"identity.embedding.{k}": v for k, v in pipe.identity.embedding.state_dict().items()}
    state.update({f"unet.{k}": v for k, v in adapters.adapter_state_dict(pipe.pipe.unet).items()})
    torch.save({"state_dict": state, "uniportrait": {"stage": 2, "format": 1},
                "hyper_parameters": {"lora_rank": RANK, "qformer": {"dim_head": 16, "heads": 4}}}, tmp_path / "m.ckpt")
    convert.export_checkpoint_safetensors(tmp_path / "m.ckpt", tmp_path / "m.safetensors")
    ours = UniPortraitPipeline.from_checkpoint(world["paths"], tmp_path / "m.safetensors")
    for ids in ([ID_A], [ID_A, ID_B]):
        assert np.array_equal(image_array(_run(ours, ids).images), image_array(_run(pipe, ids).images))



def test_export_cli_writes_the_released_layout_that_generates_identically(world: dict, pipe: UniPortraitPipeline,
                                                                         tmp_path: Path) -> None:
    """A checkpoint trained here -> `python -m src.export` -> released files -> the same images."""
    from src.cli import export
    from tests.helpers import write_components_yaml

    write_components_yaml(world["paths"], tmp_path / "c.yaml")
    state = {f"identity.embedding.{k}": v for k, v in pipe.identity.embedding.state_dict().items()}
    full = adapters.adapter_state_dict(pipe.pipe.unet)
    for stage in (2, 1):
        unet = full if stage == 2 else {k: v for k, v in full.items() if "router" not in k and "multi_id" not in k}
        ckpt = tmp_path / f"stage{stage}.ckpt"
        torch.save({"state_dict": {**state, **{f"unet.{k}": v for k, v in unet.items()}},
                    "uniportrait": {"stage": stage, "format": 1},
                    "hyper_parameters": {"lora_rank": RANK, "qformer": {"dim_head": 16, "heads": 4}}}, ckpt)
        out = tmp_path / f"released{stage}"
        written = export.main(["--checkpoint", str(ckpt), "--components", str(tmp_path / "c.yaml"), "--out", str(out)])
        names = sorted(p.name for p in written)
        assert names == (["uniportrait-faceid_sd15.bin", "uniportrait-router_sd15.bin"] if stage == 2
                         else ["uniportrait-faceid_sd15.bin"])
        router = out / "uniportrait-router_sd15.bin" if stage == 2 else None
        back = UniPortraitPipeline.from_released(world["paths"], out / "uniportrait-faceid_sd15.bin", router,
                                                 dim_head=16)
        ours = UniPortraitPipeline.from_checkpoint(world["paths"], ckpt)
        for ids in ([ID_A], [ID_A, ID_B]) if stage == 2 else ([ID_A],):
            assert np.array_equal(image_array(_run(back, ids).images), image_array(_run(ours, ids).images))
    assert np.array_equal(image_array(_run(back, [ID_A]).images), image_array(_run(pipe, [ID_A]).images))


def stage2_checkpoint(world: dict, pipe: UniPortraitPipeline, tmp_path: Path) -> Path:
    """`pipe`'s adapters as a stage-2 checkpoint of ours (tmp_path/stage2.ckpt), its components in tmp_path/c.yaml."""
    from tests.helpers import write_components_yaml

    write_components_yaml(world["paths"], tmp_path / "c.yaml")
    state = {f"identity.embedding.{k}": v for k, v in pipe.identity.embedding.state_dict().items()}
    state.update({f"unet.{k}": v for k, v in adapters.adapter_state_dict(pipe.pipe.unet).items()})
    ckpt = tmp_path / "stage2.ckpt"
    torch.save({"state_dict": state, "uniportrait": {"stage": 2, "format": 1},
                "hyper_parameters": {"lora_rank": RANK, "qformer": {"dim_head": 16, "heads": 4}}}, ckpt)
    return ckpt


def test_export_records_a_non_released_head_width_or_says_how_to_load_it(world: dict, pipe: UniPortraitPipeline,
                                                                       tmp_path: Path, caplog) -> None:
    """The tiny Q-Former's head width is 16, not the released 64, and no tensor shape tells it: the
    `.safetensors` export records it, so loading needs no `--dim-head` and gives the checkpoint's identity
    tokens; the `.bin` export (which cannot record it) warns with the `--dim-head` to load it with."""
    from src.cli import export
    from src.inference import arch

    ckpt = stage2_checkpoint(world, pipe, tmp_path)
    common = ["--checkpoint", str(ckpt), "--components", str(tmp_path / "c.yaml")]
    files = export.main([*common, "--out", str(tmp_path / "st"), "--safetensors"])
    assert [arch.file_metadata(f) for f in files] == [{"dim_head": "16"}] * 2
    assert {arch.released_arch(f) for f in files} == {"sd15"}
    back = UniPortraitPipeline.from_released(world["paths"], files[0], files[1])  # dim_head from the file
    for ids in ([ID_A], [ID_A, ID_B]):
        assert np.array_equal(image_array(_run(back, ids).images), image_array(_run(pipe, ids).images))
    with caplog.at_level("WARNING", logger="src.inference.loading"):
        export.main([*common, "--out", str(tmp_path / "bin")])
    assert "--dim-head 16" in caplog.text


def test_export_float16_halves_the_files_and_loads_back_the_rounded_weights(world: dict, pipe: UniPortraitPipeline,
                                                                           tmp_path: Path) -> None:
    """`--dtype float16` (the released files' dtype): every floating tensor is fp16, the files are about half the
    float32 size, and loading them back gives exactly the fp16-rounded weights."""
    from src.cli import export

    ckpt = stage2_checkpoint(world, pipe, tmp_path)
    common = ["--checkpoint", str(ckpt), "--components", str(tmp_path / "c.yaml")]
    full = export.main([*common, "--out", str(tmp_path / "fp32")])
    half = export.main([*common, "--out", str(tmp_path / "fp16"), "--dtype", "float16"])
    for f32, f16 in zip(full, half):
        assert 0.4 < f16.stat().st_size / f32.stat().st_size < 0.6, f16.name
        sections = torch.load(f16, weights_only=True)
        assert all(v.dtype == torch.float16 for sd in sections.values() for v in sd.values() if v.is_floating_point())
    back = UniPortraitPipeline.from_released(world["paths"], half[0], half[1], dim_head=16)
    ours = UniPortraitPipeline.from_checkpoint(world["paths"], ckpt)
    got = adapters.adapter_state_dict(back.pipe.unet)
    want = adapters.adapter_state_dict(ours.pipe.unet)
    assert got.keys() == want.keys()
    assert any(not torch.equal(want[k], want[k].half().float()) for k in want)  # the cast does round something
    for k in want:
        assert torch.equal(got[k], want[k].half().to(got[k].dtype)), k
    for k, v in ours.identity.embedding.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(back.identity.embedding.state_dict()[k], v.half().to(v.dtype)), k

def test_fused_lora_matches_unfused(pipe: UniPortraitPipeline) -> None:
    plain_single, plain_multi = _run(pipe, [ID_A]), _run(pipe, [ID_A, ID_B])
    pipe.fuse_lora(True)
    try:
        fused_single, fused_multi = _run(pipe, [ID_A]), _run(pipe, [ID_A, ID_B])
        assert pipe._fused == "multi_id"
    finally:
        pipe.fuse_lora(False)
    assert np.abs(image_array(fused_single.images) - image_array(plain_single.images)).max() <= 2
    assert np.abs(image_array(fused_multi.images) - image_array(plain_multi.images)).max() <= 2
    again = _run(pipe, [ID_A])
    assert np.array_equal(image_array(again.images), image_array(plain_single.images))  # unfused exactly again


def test_swapping_the_fused_lora_many_times_leaves_the_base_weights_exact(pipe: UniPortraitPipeline) -> None:
    """A server alternating one- and two-person requests with `--fuse-lora` swaps the merged LoRA every call:
    the base weights must come back bit for bit (unmerging by subtraction left rounding behind each time)."""
    base = {k: v.clone() for k, v in pipe.pipe.unet.state_dict().items() if "base_layer" in k}
    assert base
    pipe.fuse_lora(True)
    try:
        for i in range(20):
            pipe.activate_lora("multi_id" if i % 2 else "single_id")
        assert pipe._fused == "multi_id"
    finally:
        pipe.fuse_lora(False)
    after = pipe.pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_controlnet_pipeline_runs_with_the_adapters(world: dict) -> None:
    nets = world["paths"].build()
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(nets.unet, conditioning_embedding_out_channels=(8, 16, 16))
    emb = convert.id_embedding_from_state_dict(torch.load(world["faceid"], weights_only=True)["faceid_proj"], 16)
    convert.prepare_unet(nets.unet, id_dim=64, num_tokens=16, lora_rank=RANK, multi=True)
    convert.load_released(world["faceid"], world["router"], nets.unet, emb)
    cn = UniPortraitPipeline.from_components(nets, emb, controlnet=controlnet)
    assert not any(isinstance(p, FaceIDAttnProcessor) for p in controlnet.attn_processors.values())
    control = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    with_id = _run(cn, [ID_A], control_image=control)
    without = _run(cn, [ID_A], control_image=control, faceid_scale=0.0)
    assert with_id.images[0].size == (64, 64)
    assert not np.array_equal(image_array(with_id.images), image_array(without.images))
    maps = _run(cn, [ID_A, ID_B], control_image=control, return_routing_maps=True).routing_maps
    assert len(maps) == len(adapters.faceid_processors(nets.unet))
    with pytest.raises(ValueError, match="control_image"):
        _run(cn, [ID_A])


def test_face_less_photo_is_rejected_naming_the_file(pipe: UniPortraitPipeline, tmp_path: Path) -> None:
    blank = tmp_path / "blank_photo.png"
    Image.new("RGB", (96, 96), (128, 128, 128)).save(blank)
    with pytest.raises(NoFaceError, match="blank_photo.png"):
        _run(pipe, [Identity(references=[blank])])


def test_from_checkpoint_reads_what_the_training_module_saves(world: dict, tmp_path: Path) -> None:
    from src.models.id_embedding import QFormerSpec
    from src.module import UniPortraitModule

    torch.manual_seed(0)
    module = UniPortraitModule(world["paths"], stage=2, lora_rank=RANK,
                               qformer=QFormerSpec(depth=2, width=64, heads=4, dim_head=16))
    with torch.no_grad():
        for p in module.unet.parameters():
            if p.requires_grad or p.ndim == 2 and p.shape[0] == RANK:
                p.normal_(0, 0.05)
    ckpt: dict = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)  # what Lightning's ModelCheckpoint writes for this module
    torch.save(ckpt, tmp_path / "last.ckpt")
    ours = UniPortraitPipeline.from_checkpoint(world["paths"], tmp_path / "last.ckpt")
    saved = module.adapter_state_dict()
    loaded = {f"unet.{k}": v for k, v in adapters.adapter_state_dict(ours.pipe.unet).items()}
    loaded.update({f"identity.embedding.{k}": v for k, v in ours.identity.embedding.state_dict().items()})
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert len(_run(ours, [ID_A, ID_B], return_routing_maps=True).routing_maps) == 7
