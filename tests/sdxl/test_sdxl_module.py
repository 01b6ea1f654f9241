"""SDXL support on the tiny SDXL world (src/tiny/sdxl.py, written from the tiny SD1.5 world into a temporary folder):
architecture detection, SDXL's text conditioning and time_ids (src/models/conditioning.py), and both training stages
of UniPortraitModule with the UNet's added conditions."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModelWithProjection

from src.models import adapters
from src.models.conditioning import (
    TextConditioning,
    batch_added_conditions,
    batch_time_ids,
    compute_time_ids,
    encode_prompt,
)
from src.models.id_embedding import QFormerSpec
from src.models.presets import ComponentPaths, detect_arch
from src.module import MULTI, SINGLE, UniPortraitModule
from src.tiny import tiny_components
from src.tiny.architectures import TINY_SDXL_HIDDEN, TINY_SDXL_POOLED
from tests.test_module import batch_from

CROSS = sum(TINY_SDXL_HIDDEN)  # 32 + 32


@pytest.fixture(scope="module")
def nets(sdxl_world):
    return tiny_components(sdxl_world).build()


def make_module(world: Path, **kw) -> UniPortraitModule:
    torch.manual_seed(0)
    kw.setdefault("qformer", QFormerSpec(depth=1, width=32, heads=2, dim_head=16))
    return UniPortraitModule(components=tiny_components(world), lora_rank=4, lr=1e-3, **kw)


def sized(batch: dict, original: list[list[int]], crop: list[list[int]]) -> dict:
    """The batch with its SDXL size fields set (long (B, 2) each, as the collate writes them)."""
    return {**batch, "original_size": torch.tensor(original), "crop_top_left": torch.tensor(crop)}


def perturb_face_values(m: UniPortraitModule) -> None:
    """A trained-looking face-ID branch: to_v_faceid starts at zero, where no gradient reaches the tokens."""
    with torch.no_grad():
        for n, p in adapters.faceid_parameters(m.unet).items():
            if "to_v_faceid" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


# ---------------------------------------------------------------------------------------------- detection
def test_an_sdxl_directory_loads_two_text_encoders_and_sd15_stays_sd15(tiny_world, sdxl_world, nets):
    assert tiny_components(sdxl_world).arch == "sdxl" and nets.arch == "sdxl"
    assert isinstance(nets.text_encoder_2, CLIPTextModelWithProjection) and nets.tokenizer_2 is not None
    assert len(nets.text_encoders) == len(nets.tokenizers) == 2
    assert nets.unet.config.cross_attention_dim == CROSS
    assert not any(p.requires_grad for p in nets.text_encoder_2.parameters())
    sd15 = tiny_components(tiny_world).build()
    assert tiny_components(tiny_world).arch == "sd15" and sd15.arch == "sd15"
    assert sd15.text_encoder_2 is None and sd15.tokenizer_2 is None and len(sd15.text_encoders) == 1


def test_a_half_sdxl_directory_names_the_missing_subfolder(tmp_path):
    half = tmp_path / "half"
    (half / "text_encoder_2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"base_model/tokenizer_2"):
        detect_arch(half)
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    (indexed / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(FileNotFoundError, match=r"base_model/text_encoder_2.*model_index\.json"):
        detect_arch(indexed)


def test_validate_names_a_missing_sdxl_subfolder(sdxl_world, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sdxl_world / "base", base, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer_2"))
    paths = ComponentPaths(str(base), str(sdxl_world / "clip.safetensors"),
                           str(sdxl_world / "face_backbone.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer_2"):
        paths.validate()


# ---------------------------------------------------------------------------------------------- conditioning
def test_prompt_encoding_matches_diffusers_sdxl_pipeline(nets):
    """Penultimate hidden states of both encoders concatenated, text_encoder_2's text_embeds pooled: what
    diffusers' StableDiffusionXLPipeline.encode_prompt gives on the same networks."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=nets.vae, text_encoder=nets.text_encoder, text_encoder_2=nets.text_encoder_2,
                                     tokenizer=nets.tokenizer, tokenizer_2=nets.tokenizer_2, unet=nets.unet,
                                     scheduler=nets.scheduler)
    captions = ["a photo of a woman", "two people at the beach"]
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        got = encode_prompt(captions, nets.tokenizers, nets.text_encoders)
    assert got.hidden.shape == (2, 77, CROSS) and got.pooled.shape == (2, TINY_SDXL_POOLED)
    assert torch.equal(got.hidden, want) and torch.equal(got.pooled, want_pooled)
    with torch.no_grad():  # SD1.5's path: the last hidden state of one encoder, no pooled condition
        sd15 = encode_prompt(captions, (nets.tokenizer, None), (nets.text_encoder, None))
        assert sd15.pooled is None and torch.equal(sd15.hidden, nets.text_encoder(pipe.tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids)[0])


def test_time_ids_are_original_size_crop_and_target_size():
    batch = {"image": torch.zeros(2, 3, 64, 48), "original_size": torch.tensor([[100, 80], [64, 48]]),
             "crop_top_left": torch.tensor([[3, -2], [0, 0]])}
    want = torch.tensor([[100.0, 80, 3, -2, 64, 48], [64, 48, 0, 0, 64, 48]])
    assert torch.equal(batch_time_ids(batch), want)
    assert torch.equal(compute_time_ids(batch["original_size"], batch["crop_top_left"], torch.tensor([64, 48])), want)
    # no size fields (data written before them): an uncropped image of the target size
    assert torch.equal(batch_time_ids({"image": batch["image"]}), torch.tensor([[64.0, 48, 0, 0, 64, 48]] * 2))
    with pytest.raises(KeyError, match="crop_top_left"):
        batch_time_ids({"image": batch["image"], "original_size": batch["original_size"]})
    with pytest.raises(ValueError, match=r"original_size.*\(2, 2\)"):
        batch_time_ids({**batch, "original_size": torch.tensor([100, 80])})
    pooled = torch.ones(2, 4)
    added = batch_added_conditions(TextConditioning(torch.zeros(2, 77, 8), pooled), batch)
    assert added["text_embeds"] is pooled and torch.equal(added["time_ids"], want)
    assert batch_added_conditions(TextConditioning(torch.zeros(2, 77, 8)), batch) is None  # SD1.5


def test_the_unet_gets_the_batch_crop_and_the_loss_depends_on_it(sdxl_world, tiny_world):
    """The training step passes time_ids built from the batch's original_size / crop_top_left (checked at the
    UNet's input) and the pooled text; two batches that differ only in the crop give different losses under
    the same noise, identical batches the same loss."""
    m = make_module(sdxl_world).eval()
    base = batch_from(tiny_world, n=2)  # the SDXL world trains on the SD1.5 world's data
    a = sized(base, [[512, 384], [64, 64]], [[0, 0], [0, 0]])
    b = sized(base, [[512, 384], [64, 64]], [[40, -8], [12, 0]])
    seen = []
    hook = m.unet.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["added_cond_kwargs"]),
                                            with_kwargs=True)
    losses = []
    for batch in (a, b, a):
        torch.manual_seed(1)
        with torch.no_grad():
            losses.append(m.shared_step(batch)["diffusion"])
    hook.remove()
    assert torch.equal(seen[1]["time_ids"], torch.tensor([[512.0, 384, 40, -8, 64, 64], [64, 64, 12, 0, 64, 64]]))
    assert seen[1]["text_embeds"].shape == (2, TINY_SDXL_POOLED)
    assert torch.equal(losses[0], losses[2]) and not torch.equal(losses[0], losses[1])


def test_the_probes_pass_the_batch_crop(sdxl_world, tiny_world):
    """identity_gap and routing_maps (stage 2) run the UNet with the batch's time_ids: another crop, other figures."""
    m = make_module(sdxl_world, stage=2).eval()
    perturb_face_values(m)
    base = batch_from(tiny_world, multi=True, n=4)  # identity_gap needs pairs of images sharing no identity
    sizes = [[256, 256], [128, 96], [64, 64], [80, 80]]
    a = sized(base, sizes, [[0, 0]] * 4)
    b = sized(base, sizes, [[32, 16], [-4, 8], [0, 0], [2, 2]])
    gaps = [m.identity_gap(batch, generator=torch.Generator().manual_seed(0))[0] for batch in (a, b, a)]
    assert gaps[0].numel() and torch.equal(gaps[0], gaps[2]) and not torch.equal(gaps[0], gaps[1])
    maps = [m.routing_maps(batch, 500, seed=0)["probs"] for batch in (a, b)]
    assert maps[0] and any(not torch.equal(p, q) for p, q in zip(*maps))
    added = m.probe_inputs(b)[4]
    assert torch.equal(added["time_ids"][1], torch.tensor([128.0, 96, -4, 8, 64, 64]))


# ---------------------------------------------------------------------------------------------- training
def test_stage1_and_stage2_train_on_sdxl_with_adapters_at_its_width(sdxl_world, tiny_world, tmp_path):
    """Adapters sized by cross_attention_dim = hidden_1 + hidden_2: face-ID projections, Q-Former output and
    routers; stage 1 and stage 2 steps (stage 2 initialised from a stage-1 checkpoint) give finite losses and
    gradients in every trained group."""
    m = make_module(sdxl_world).train()
    procs = adapters.faceid_processors(m.unet)
    assert procs and all(p.to_k_faceid.in_features == CROSS and p.to_v_faceid.in_features == CROSS
                         for p in procs.values())
    assert m.identity.embedding.output_dim == CROSS
    batch = sized(batch_from(tiny_world, n=2), [[96, 96], [80, 64]], [[4, 4], [0, 8]])
    tokens = m.batch_identity_tokens(batch)
    assert tokens.shape[-1] == CROSS  # (B, N, Q, 64)
    perturb_face_values(m)
    out = m.shared_step(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, params in (("id_embedding", list(m.identity.embedding.parameters())),
                         ("faceid", list(adapters.faceid_parameters(m.unet).values())),
                         ("lora_single_id", list(adapters.lora_parameters(m.unet, SINGLE).values()))):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name

    ckpt = {}
    m.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "stage1.ckpt")
    m2 = make_module(sdxl_world, stage=2, init_from=str(tmp_path / "stage1.ckpt")).train()
    routers = [p.router for p in adapters.faceid_processors(m2.unet).values()]
    assert routers and all(r is not None and r.id_dim == CROSS for r in routers)
    multi = sized(batch_from(tiny_world, multi=True, n=2), [[64, 64], [64, 64]], [[0, 0], [0, 0]])
    out = m2.shared_step(multi)
    assert set(out) == {"diffusion", "routing", "loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in adapters.router_parameters(m2.unet).values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.lora_parameters(m2.unet, MULTI).values())


def test_a_batch_without_size_fields_trains_as_uncropped(sdxl_world, tiny_world):
    """Data written before original_size / crop_top_left: the step runs, with time_ids of an uncropped image."""
    m = make_module(sdxl_world).eval()
    batch = {k: v for k, v in batch_from(tiny_world, n=2).items() if k not in ("original_size", "crop_top_left")}
    uncropped = sized(batch, [[64, 64], [64, 64]], [[0, 0], [0, 0]])
    losses = []
    for b in (batch, uncropped):
        torch.manual_seed(3)
        with torch.no_grad():
            losses.append(m.shared_step(b)["loss"])
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])


def test_the_tiny_sdxl_configs_train_through_the_cli(sdxl_world, tiny_world, tmp_path):
    """configs/tiny/sdxl/stage{1,2}.yaml on the tiny SDXL world: stage 1 takes an optimizer step on a finite
    loss, stage 2 builds from that run's checkpoint; both load the SDXL base model."""
    from src.cli.train import main
    from tests.helpers import SMALL_MODEL, tiny_args

    configs = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "sdxl"
    for stage, multi in ((1, False), (2, True)):
        args = ["fit", f"--config={configs / f'stage{stage}.yaml'}", *tiny_args(tiny_world, multi=multi), *SMALL_MODEL,
                f"--model.components.base_model={sdxl_world / 'base'}", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false", "--trainer.callbacks=[]"]
        if stage == 1:
            cli = main([*args, "--trainer.fast_dev_run=1"])
            assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
            ckpt = tmp_path / "stage1.ckpt"
            cli.trainer.save_checkpoint(ckpt)
        else:
            cli = main([*args, f"--model.init_from={ckpt}"], run=False)
        assert cli.model.stage == stage and cli.model.text_encoder_2 is not None
        assert cli.model.unet.config.addition_embed_type == "text_time"
