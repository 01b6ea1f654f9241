"""SD1.5- and SDXL-scale benchmark: training and inference speed on random weights, nothing downloaded.

    python -m src.bench_sd15                 # on a GPU: SD1.5 UNet / VAE / text encoder, ViT-H/14, IR-101, 512 px
    python -m src.bench_sd15 --arch sdxl     # on a GPU: SDXL UNet / VAE / both text encoders, 1024 px
    python -m src.bench_sd15 --arch tiny     # the same code on the tiny presets (what the CPU tests run;
    python -m src.bench_sd15 --arch tiny-sdxl  # tiny-sdxl: the tiny SDXL world's networks)

In one run, on one device:
- a **matmul peak** (bf16 8192^3 on a GPU) that MFU is measured against;
- **training steps** (forward, backward, AdamW; bf16 autocast on a GPU) at `--batch-size`, img/s, FLOPs
  per image (counted by `torch.utils.flop_counter`), MFU and peak memory:
  `baseline` = the diffusers LoRA-training example's loop (eager UNet with peft LoRA rank R on
  to_q/to_k/to_v/to_out.0, VAE latents and text embeddings computed every step; on SDXL, as its SDXL
  example, both text encoders, the pooled embedding and time_ids);
  `stage 1` and `stage 2` = UniPortraitModule's full step (frozen VAE, text encoder, IR-101 and
  ViT-H/14 included; stage 2 with 2-3 identities, router and routing loss);
  `stage 1, UNet part` = the same UNet forward/backward on precomputed conditioning (the cost left with
  cached latents and features);
  each UniPortrait row also with `--compile` (torch.compile of the UNet) when asked;
- **inference**: `--steps` DDIM steps with CFG at the UNet's native size, fp16 on a GPU: the plain SD1.5
  (SDXL) pipeline against UniPortrait with 0, 1 and 2 identities (active LoRA merged into the weights).
Each row is isolated: an error in it (out of memory, a compile failure) becomes that row's result and the
other rows go on. The tables are rewritten (printed and, unless --no-record, written between markers in
docs/benchmarks.md with card, versions and date; one section per architecture) after every row, so a run
stopped midway keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from src.benchmarks.measure import Device, count_flops, frozen_flops, isolated, model_flops, no_recompute
from src.benchmarks.steps import module_step, optimizer_of
from src.models.conditioning import TextConditioning, batch_added_conditions, encode_prompt

BEGIN, END = "<!-- bench:sd15:begin -->", "<!-- bench:sd15:end -->"  # the SD1.5 rows' section (see `markers`)
FAST_NOTE = ("UniPortrait rows with frozen weights in bf16 and fused AdamW (configs/stage1.yaml), the baseline "
             "with its frozen weights in bf16 (as the diffusers example); ")


# ---------------------------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """Everything that differs between the SD1.5-scale run and its tiny stand-in."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    clip_vision: dict[str, Any]
    clip_embed_dim: int
    face: dict[str, Any]
    qformer: dict[str, Any]
    lora_rank: int
    text_2: dict[str, Any] | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection); None on SD1.5
    resolution: int = 512  # the native training / inference size
    sdxl: bool = False  # an SDXL UNet (two text encoders, micro-conditioning) rather than an SD1.5 one

    @property
    def label(self) -> str:
        return "SDXL" if self.sdxl else "SD1.5"


def markers(arch: Arch) -> tuple[str, str]:
    """The docs/benchmarks.md markers of `arch`'s section: SD1.5's (BEGIN, END), SDXL's their own."""
    return (BEGIN, END) if not arch.sdxl else ("<!-- bench:sdxl:begin -->", "<!-- bench:sdxl:end -->")


SD15 = Arch(
    name="sd15",
    unet=dict(sample_size=64, cross_attention_dim=768),  # diffusers' defaults are SD1.5's otherwise
    vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
             scaling_factor=0.18215),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    clip_vision=dict(image_size=224, patch_size=14, width=1280, layers=32, head_width=80),  # ViT-H/14
    clip_embed_dim=1024,
    face=dict(num_layers=100),  # IR-101
    qformer={},  # QFormerSpec defaults: 6 x 16 x 768
    lora_rank=128,
)

# SDXL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder(_2)/config.json);
# the identity encoders are SD1.5's (UniPortrait's ViT-H/14 and IR-101), the Q-Former's output width the UNet's 2048.
SDXL = Arch(
    name="sdxl",
    unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),  # 6 time ids x 256 + pooled 1280
    vae={**SD15.vae, "sample_size": 1024, "scaling_factor": 0.13025},
    text=dict(SD15.text),  # CLIP ViT-L/14's text tower, as SD1.5's
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),  # OpenCLIP ViT-bigG/14's
    clip_vision=SD15.clip_vision,
    clip_embed_dim=SD15.clip_embed_dim,
    face=SD15.face,
    qformer={},
    lora_rank=128,
    resolution=1024,
    sdxl=True,
)


def tiny_arch(sdxl: bool = False) -> Arch:
    """The tiny preset (`tiny`), or the tiny SDXL world's networks (`tiny-sdxl`)."""
    from src.tiny import architectures

    return Arch(name="tiny-sdxl" if sdxl else "tiny", unet={}, vae={}, text={}, sdxl=sdxl,
                clip_vision=dict(architectures.TINY_CLIP_VISION), clip_embed_dim=architectures.TINY_CLIP_EMBED_DIM,
                face=dict(num_layers=18, widths=architectures.TINY_FACE_WIDTHS,
                          embedding_size=architectures.TINY_FACE_EMBEDDING),
                qformer=dict(depth=2, width=64, heads=4, dim_head=16), lora_rank=16, resolution=64)


ARCHS = {"sd15": lambda: SD15, "sdxl": lambda: SDXL, "tiny": tiny_arch, "tiny-sdxl": lambda: tiny_arch(sdxl=True)}


def build_nets(arch: Arch, tokenizer_dir: Path):
    """Random-weight base networks of `arch` (frozen, eval) as `presets.Components`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from src.models import presets
    from src.models.clip_encoder import ClipPatchEncoder
    from src.models.face_backbone import IRBackbone, freeze
    from src.tiny import architectures

    def text_config(cfg: dict[str, Any], pad: int = 49407) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=pad, **cfg)

    text_2 = tokenizer_2 = None
    if arch.name == "tiny":
        unet, vae, text = architectures.tiny_unet(), architectures.tiny_vae(), architectures.tiny_text_encoder()
    elif arch.name == "tiny-sdxl":
        unet, vae = architectures.tiny_sdxl_unet(), architectures.tiny_vae()
        text, text_2 = architectures.tiny_sdxl_text_encoders()
    else:
        unet, vae = UNet2DConditionModel(**arch.unet), AutoencoderKL(**arch.vae)
        text = CLIPTextModel(text_config(arch.text))
        if arch.text_2 is not None:  # SDXL's second tokenizer pads with "!" (id 0)
            text_2 = CLIPTextModelWithProjection(text_config(arch.text_2, pad=0))
    tokenizer = presets.write_clip_tokenizer(tokenizer_dir)
    if text_2 is not None:
        tokenizer_2 = presets.write_clip_tokenizer(tokenizer_dir.with_name(tokenizer_dir.name + "_2"), pad_token="!")
    clip = ClipPatchEncoder.from_open_clip_vision_config(arch.clip_vision, arch.clip_embed_dim)
    face = freeze(IRBackbone(**arch.face))
    for m in (unet, vae, text, text_2):
        if m is not None:
            m.requires_grad_(False).eval()
    return presets.Components(unet, vae, text, tokenizer, presets.sd15_scheduler(), clip, face, text_2, tokenizer_2)


class Prebuilt:
    """Stands in for `ComponentPaths` when the networks are already in memory (`build()` returns them)."""

    def __init__(self, nets) -> None:
        self.nets = nets

    def build(self):
        return self.nets


# ---------------------------------------------------------------------------------------------- batches
def random_batch(arch: Arch, nets, batch: int, resolution: int, faces: list[int], device: torch.device, seed: int):
    """A training batch of the collate contract with random pixels; `faces[i]` identities in image i."""
    g = torch.Generator().manual_seed(seed)
    n_max = max(faces)
    s = nets.clip.image_size
    valid = torch.zeros(batch, n_max, dtype=torch.bool)
    masks = torch.zeros(batch, n_max, resolution, resolution)
    side = resolution // 4
    for i, n in enumerate(faces):
        valid[i, :n] = True
        for k in range(n):  # disjoint square faces along the diagonal
            masks[i, k, k * side:(k + 1) * side, k * side:(k + 1) * side] = 1
    out = {
        "image": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
        "caption": ["a photo of a person"] * batch,
        "face_recog": torch.rand(batch, n_max, 3, 112, 112, generator=g) * 2 - 1,
        "face_clip": torch.rand(batch, n_max, 3, s, s, generator=g) * 2 - 1,
        "face_masks": masks,
        "face_valid": valid,
    }
    if arch.sdxl:  # SDXL's micro-conditioning: uncropped images of the training size
        out["original_size"] = torch.full((batch, 2), resolution, dtype=torch.long)
        out["crop_top_left"] = torch.zeros(batch, 2, dtype=torch.long)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- training rows
def unet_part_step(module, batch, opt) -> Callable[[], None]:
    """Stage-1 UNet forward/backward on precomputed latents, text and identity tokens."""
    with torch.no_grad():
        latents = module.encode_images(batch["image"])
        prompt = module.encode_prompt(batch["caption"])
        added = batch_added_conditions(prompt, batch)  # SDXL's pooled text + time_ids; None on SD1.5
        tokens = module.identity_tokens(batch["face_recog"], batch["face_clip"], batch["face_valid"]).detach()

    def step() -> None:
        noise, t, noisy = module._sample_noise(latents)
        pred = module._denoise(noisy, t, prompt.hidden, module._context(tokens, batch["face_valid"], latents, None),
                               added)
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@dataclass
class Baseline:
    """The baseline loop: `step` (one training step), `encoders` (its frozen VAE + text-encoder forward alone)."""

    step: Callable[[], None]
    encoders: Callable[[], Any]


def baseline_step(nets, batch, rank: int, device: torch.device, weight_dtype: torch.dtype = torch.float32) -> Baseline:
    """The diffusers LoRA-training example's loop (train_text_to_image_lora.py) on fresh copies of the networks:
    frozen UNet, VAE and text encoder in `weight_dtype` (bf16 under bf16 mixed precision, as the example casts
    them), peft LoRA rank `rank` on to_q/to_k/to_v/to_out.0 kept in fp32 (its `cast_training_params`), eager,
    latents and text embeddings computed every step. On SDXL (train_text_to_image_lora_sdxl.py): both text
    encoders, the pooled embedding and time_ids as added conditions."""
    import copy

    from peft import LoraConfig

    unet = copy.deepcopy(nets.unet).to(device, weight_dtype)
    vae = copy.deepcopy(nets.vae).to(device, weight_dtype)
    text_encoders = [copy.deepcopy(e).to(device, weight_dtype) for e in nets.text_encoders]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable LoRA weights in fp32
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    tokenizers = (nets.tokenizer, nets.tokenizer_2)[: len(text_encoders)]
    sched = nets.scheduler

    @torch.no_grad()
    def encoders() -> tuple[torch.Tensor, TextConditioning]:
        latents = vae.encode(batch["image"].to(weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
        return latents, encode_prompt(batch["caption"], tokenizers, text_encoders)

    def step() -> None:
        latents, prompt = encoders()
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=prompt.hidden,
                    added_cond_kwargs=batch_added_conditions(prompt, batch)).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Baseline(step, encoders)


def make_module(arch: Arch, nets, stage: int, compile_unet: bool, device: torch.device,
                gradient_checkpointing: bool = False, fast: bool = False):
    """UniPortraitModule on `nets` (its own copy of the UNet). `fast`: configs/stage1.yaml's speed settings, frozen
    weights in bf16 (`frozen_dtype`, which casts the shared frozen encoders in place) and fused AdamW."""
    import copy
    import functools

    from src.models.id_embedding import QFormerSpec
    from src.module import UniPortraitModule

    own = copy.copy(nets)
    own.unet = copy.deepcopy(nets.unet)  # adapters are installed in place: keep the base UNet clean
    extra: dict[str, Any] = {}
    if fast:
        extra = dict(frozen_dtype="bfloat16",
                     optimizer=functools.partial(torch.optim.AdamW, weight_decay=1e-2, fused=True))
    module = UniPortraitModule(components=Prebuilt(own), stage=stage, lora_rank=arch.lora_rank,
                               qformer=QFormerSpec(**arch.qformer), lr=1e-5, compile_unet=compile_unet,
                               gradient_checkpointing=gradient_checkpointing, **extra)
    return module.to(device)


def training_rows(arch: Arch, nets, dev: Device, batch_size: int, resolution: int, iters: int, warmup: int,
                  peak: float, compile_unet: bool, log: Callable[[str], None], big_batch: int = 0,
                  on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Every training row, each isolated (`isolated`); `on_row(rows)` after each one."""
    rows: list[dict] = []
    flops_of: dict[str, tuple[float, float]] = {}  # name -> (model, frozen) per image; compiled rows: the same math

    def measure(name: str, step: Callable[[], None], compiled: bool = False, batch: int = batch_size, module=None,
                inputs: dict[str, Any] | None = None, per_image: tuple[float, float] | None = None) -> None:
        """Time `step`; its FLOPs per image are `per_image` (model, frozen) when given, else counted here on
        `module` / `inputs` (frozen encoders apart, recompute excluded)."""
        with dev.autocast():
            step()  # first call outside the timing (compilation, allocator warm-up)
            if per_image is not None:
                flops_of.setdefault(name, per_image)
            if name not in flops_of:
                frozen = frozen_flops(module, inputs) if module is not None and inputs is not None else 0.0
                unet = module.unet if module is not None else None
                flops_of[name] = (model_flops(step, unet, frozen) / batch, frozen / batch)
            model, frozen = flops_of[name]
            dev.reset_memory()
            sec = dev.timed(step, iters, warmup)
        row = {"row": name, "compiled": compiled, "batch": batch, "step_s": sec, "img_s": batch / sec,
               "tflop_img": model / 1e12, "frozen_tflop_img": frozen / 1e12, "mfu": model * batch / sec / 1e12 / peak,
               "peak_gb": dev.peak_memory_gb()}
        rows.append(row)
        log(f"{name}{' (compiled)' if compiled else ''}: {row['img_s']:.1f} img/s, MFU {row['mfu']:.1%}, "
            f"peak {row['peak_gb']:.1f} GB")

    single = random_batch(arch, nets, batch_size, resolution, [1] * batch_size, dev.device, seed=0)
    multi = random_batch(arch, nets, batch_size, resolution, [2 + i % 2 for i in range(batch_size)], dev.device, 1)

    with isolated("baseline LoRA loop", rows, log, dev, on_row):
        base = baseline_step(nets, single, arch.lora_rank, dev.device, dev.amp or torch.float32)
        frozen = count_flops(base.encoders)
        per_image = ((count_flops(base.step) - frozen) / batch_size, frozen / batch_size)
        measure("baseline LoRA loop", base.step, per_image=per_image)
        del base
    for compiled in ([False, True] if compile_unet else [False]):
        for stage, batch in ((1, single), (2, multi)):
            module = opt = None
            with isolated(f"stage {stage}", rows, log, dev, on_row):
                module = make_module(arch, nets, stage, compiled, dev.device, fast=dev.cuda)
                module.train()
                opt = optimizer_of(module)
                measure(f"stage {stage}", module_step(module, batch, opt), compiled, module=module, inputs=batch)
            if stage == 1 and opt is not None:
                with isolated("stage 1, UNet part", rows, log, dev, on_row):  # nothing frozen left in the step
                    measure("stage 1, UNet part", unet_part_step(module, batch, opt), compiled, module=module)
            del module, opt
            dev.reset_memory()
    if big_batch:  # the largest batch: stage 1 with gradient checkpointing
        with isolated("stage 1, gradient checkpointing", rows, log, dev, on_row):
            big = random_batch(arch, nets, big_batch, resolution, [1] * big_batch, dev.device, seed=2)
            module = make_module(arch, nets, 1, False, dev.device, gradient_checkpointing=True, fast=dev.cuda)
            module.train()
            # Model FLOPs per image are stage 1's (the same network; the recomputed forward is not model work):
            # taken from the stage-1 row, else counted here with checkpointing off on a stage-1-sized slice.
            per_image = flops_of.get("stage 1")
            if per_image is None:
                part = {k: v[:batch_size] for k, v in big.items()}
                with dev.autocast(), no_recompute(module.unet):
                    frozen = frozen_flops(module, part)
                    total = count_flops(module_step(module, part, optimizer_of(module)))
                per_image = ((total - frozen) / batch_size, frozen / batch_size)
            measure("stage 1, gradient checkpointing", module_step(module, big, optimizer_of(module)),
                    batch=big_batch, per_image=per_image)
            del module
    return rows


# ---------------------------------------------------------------------------------------------- inference rows
def inference_rows(arch: Arch, nets, dev: Device, steps: int, iters: int, log: Callable[[str], None],
                   on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """The plain pipeline, then UniPortrait with 0, 1 and 2 identities; each row isolated, `on_row` after each."""
    import copy

    from diffusers import DDIMScheduler

    from src.inference.arch import build_pipeline
    from src.inference.pipeline import Identity, UniPortraitPipeline
    from src.models.adapters import MULTI

    dtype = torch.float16 if dev.cuda else torch.float32
    prompt = "a photo of two people in a park"
    kw = dict(num_inference_steps=steps, guidance_scale=7.5)
    rows: list[dict] = []

    def measure(name: str, call: Callable[[], Any]) -> None:
        with torch.no_grad():
            dev.reset_memory()
            sec = dev.timed(call, iters=iters, warmup=1)
        rows.append({"row": name, "image_s": sec, "peak_gb": dev.peak_memory_gb()})
        log(f"{name}: {sec * 1000:.0f} ms/image")

    module = pipe = None
    plain_row = f"plain {arch.label} pipeline"
    with isolated(plain_row, rows, log, dev, on_row):
        module = make_module(arch, nets, 2, False, dev.device)  # before the shared encoders turn fp16
        plain = build_pipeline(nets, DDIMScheduler.from_config(nets.scheduler.config), None).to(dev.device, dtype)
        plain.set_progress_bar_config(disable=True)
        measure(plain_row, lambda: plain(prompt, **kw))
    with isolated("UniPortrait, 0 identities", rows, log, dev, on_row):
        if module is None:
            raise RuntimeError("no stage-2 module: building it failed (see the plain pipeline's row)")
        ours_nets = copy.copy(nets)
        ours_nets.unet = module.unet
        pipe = UniPortraitPipeline.from_components(ours_nets, module.identity.embedding).to(dev.device, dtype)
        pipe.pipe.set_progress_bar_config(disable=True)
        pipe.fuse_lora(True)
        pipe.activate_lora(MULTI)  # merged into the weights now, as for the calls with identities
        if not lora_merged(pipe.pipe.unet):
            raise RuntimeError("the multi-ID LoRA is not merged into the UNet's weights")
        measure("UniPortrait, 0 identities", lambda: pipe.pipe(prompt, **kw))  # processors in, no identity
    s = nets.clip.image_size
    g = torch.Generator().manual_seed(0)
    people = [Identity.from_crops(torch.rand(1, 3, 112, 112, generator=g) * 2 - 1,
                                  torch.rand(1, 3, s, s, generator=g) * 2 - 1) for _ in range(2)]
    for n in (1, 2):
        name = f"UniPortrait, {n} identit{'y' if n == 1 else 'ies'}"
        with isolated(name, rows, log, dev, on_row):
            if pipe is None:
                raise RuntimeError("no UniPortrait pipeline: building it failed (see the rows above)")
            measure(name, lambda n=n: pipe(prompt, people[:n], progress=False, **kw))
    return rows


def lora_merged(unet: torch.nn.Module) -> bool:
    """Whether every peft LoRA layer of `unet` has an adapter merged into its base weights."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(m.merged for m in layers)


# ---------------------------------------------------------------------------------------------- report
def tables(train: list[dict], infer: list[dict]) -> str:
    """Markdown tables of the rows measured so far; a failed row shows its error, ratios need their reference."""
    base = next((r["img_s"] for r in train if r["row"] == "baseline LoRA loop" and "error" not in r), None)
    plain = next((r["image_s"] for r in infer if r["row"].startswith("plain ") and "error" not in r), None)
    lines = ["| training step | compiled | batch | img/s | x baseline | model TFLOP/img | MFU | frozen TFLOP/img "
             "| peak mem (GB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        if "error" in r:
            lines.append(f"| {r['row']} | | | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['img_s'] / base:.2f}" if base else "-"
        lines.append(f"| {r['row']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} | {r['img_s']:.1f} | "
                     f"{ratio} | {r['tflop_img']:.3g} | {r['mfu']:.1%} | {r['frozen_tflop_img']:.3g} | "
                     f"{r['peak_gb']:.1f} |")
    lines += ["", "Model TFLOP/img: the trainable network's forward + backward (UNet with adapters, ID embedding), "
              "gradient checkpointing's recomputation excluded; MFU is computed from it alone. Frozen TFLOP/img: "
              "the frozen encoders' forward in the step (VAE encoder, text encoder, IR-101, CLIP tower), which "
              "precomputed latents and cached features remove."]
    lines += ["", "| inference | ms / image | x plain pipeline | peak mem (GB) |", "|---|---|---|---|"]
    for r in infer:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | |")
            continue
        ratio = f"{r['image_s'] / plain:.2f}" if plain else "-"
        lines.append(f"| {r['row']} | {r['image_s'] * 1000:.0f} | {ratio} | {r['peak_gb']:.1f} |")
    return "\n".join(lines)


def describe(dev: Device, arch: Arch, a: argparse.Namespace, peak: float) -> str:
    import diffusers
    import lightning
    import peft

    card = torch.cuda.get_device_name(dev.device) if dev.cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return (f"Measured {dt.date.today().isoformat()} on {card}; torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, lightning {lightning.__version__}, peft {peft.__version__}. Architecture "
            f"`{arch.name}`, random weights, {a.resolution} px training at batch {a.batch_size}, LoRA rank "
            f"{arch.lora_rank}, {'bf16 autocast' if dev.amp else 'fp32'}; measured matmul peak "
            f"{peak:.1f} TFLOP/s (MFU is against it); "
            f"{FAST_NOTE if dev.cuda else ''}"
            f"inference {a.steps} DDIM steps, CFG 7.5, "
            f"{'fp16' if dev.cuda else 'fp32'}.")
