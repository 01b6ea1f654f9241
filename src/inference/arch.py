"""What differs between SD1.5 and SDXL at inference: the diffusers pipeline a UniPortraitPipeline drives, the
exported file names and metadata, and the check that weights meet a UNet of the architecture they were made for.

The architecture always comes from the components (`Components.arch` / `ComponentPaths.arch`, read from the
base-model directory), never from a flag.

Exported adapter files
----------------------
SD1.5 keeps the released layout exactly: ``uniportrait-faceid_sd15.bin`` (+ ``uniportrait-router_sd15.bin``),
plain tensor dicts, or their flattened ``.safetensors`` form without metadata (docs:
shared/reference/official-checkpoints.md), except a ``dim_head`` entry when the Q-Former head width is not the
released 64 (the heads split one weight matrix, so no shape tells it). A file without architecture metadata is
SD1.5 (the released weights exist for SD1.5 only).

SDXL uses the same sections and keys, always as ``.safetensors`` (the metadata names the architecture):
``uniportrait-faceid_sdxl.safetensors`` holds ``faceid_proj.<k>`` (the ID embedding) and
``faceid_adapter.{i}.to_{k,v}_faceid.weight`` / ``faceid_adapter.{i}.to_{q,k,v,out}_lora.{down,up}.weight``
(single-ID LoRA); ``uniportrait-router_sdxl.safetensors`` holds ``faceid_adapter.{i}.to_{q,k}_router.*``,
``faceid_adapter.{i}.aggr_router.*`` and the multi-ID LoRA. ``i`` is the processor's index in the SDXL UNet's
``attn_processors`` order. Metadata (strings, as safetensors stores them)::

    uniportrait_arch     "sdxl"
    part                 "faceid" | "router"
    cross_attention_dim  the UNet's (2048 on SDXL): width of the identity tokens and text states
    lora_rank            rank of the LoRA in this file
    num_tokens           identity tokens per identity (Q-Former queries)
    dim_head             Q-Former head width (so loading needs no --dim-head)
    format               "1"
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)

from src.models.presets import Components

ARCHS = ("sd15", "sdxl")
ARCH_KEY = "uniportrait_arch"  # safetensors metadata key naming the architecture
FORMAT = "1"


def file_names(arch: str) -> tuple[str, str]:
    """Stems of the exported (face-ID file, router file) for `arch`."""
    _check_known(arch, "file_names")
    return f"uniportrait-faceid_{arch}", f"uniportrait-router_{arch}"


def _check_known(arch: str, what: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"{what}: unknown architecture {arch!r} (expected one of {ARCHS})")


def build_pipeline(components: Components, scheduler: Any, controlnet: ControlNetModel | None) -> Any:
    """diffusers' pipeline for the components' architecture: StableDiffusion(XL)Pipeline, or its ControlNet
    variant when `controlnet` is given. SDXL's micro-conditioning (`added_cond_kwargs`: pooled text and time
    ids with original size = target size, crop (0, 0)) is built by diffusers' SDXL pipeline from height/width;
    its unconditional branch follows the base model's `force_zeros_for_empty_prompt` (model_index.json)."""
    c = components
    if c.arch == "sdxl":
        common: dict[str, Any] = dict(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                      tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                      scheduler=scheduler, add_watermarker=False,
                                      force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt)
        return (StableDiffusionXLPipeline(**common) if controlnet is None
                else StableDiffusionXLControlNetPipeline(controlnet=controlnet, **common))
    common = dict(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=scheduler,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return (StableDiffusionPipeline(**common) if controlnet is None
            else StableDiffusionControlNetPipeline(controlnet=controlnet, **common))


def negative_prompt_for(arch: str, negative_prompt: str, guided: bool) -> str | None:
    """The negative prompt handed to diffusers. Without guidance: None. SDXL with an empty negative prompt:
    None too, so the pipeline's `force_zeros_for_empty_prompt` (SDXL's unconditional branch: zero text states
    and pooled embedding) applies, as in diffusers' own default; SD1.5 encodes "" as the released demo does."""
    if not guided:
        return None
    if arch == "sdxl" and not negative_prompt:
        return None
    return negative_prompt


def sdxl_metadata(part: str, cross_attention_dim: int, lora_rank: int, num_tokens: int,
                  dim_head: int) -> dict[str, str]:
    """The metadata of an exported SDXL adapter file (module docstring)."""
    return {ARCH_KEY: "sdxl", "part": part, "cross_attention_dim": str(cross_attention_dim),
            "lora_rank": str(lora_rank), "num_tokens": str(num_tokens), "dim_head": str(dim_head), "format": FORMAT}


def file_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of `path` ({} for other formats or a file without metadata)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{path}: unreadable with safetensors (truncated or not this kind of file?): {err}") from err


def released_arch(path: str | Path) -> str:
    """The architecture an adapter file was made for: its metadata's `uniportrait_arch`, else "sd15" (the
    released layout, which has no metadata)."""
    arch = file_metadata(path).get(ARCH_KEY, "sd15")
    _check_known(arch, str(path))
    return arch


def check_arch(weights_arch: str | None, base_arch: str, path: str | Path, base_model: str | Path) -> None:
    """Fail, naming both architectures and the file, when `path`'s weights (made for `weights_arch`; None:
    unknown, nothing to check) meet a base model of another architecture."""
    if weights_arch is None or weights_arch == base_arch:
        return
    raise ValueError(
        f"{path}: UniPortrait weights for {weights_arch.upper()} ({weights_arch}) cannot run on the "
        f"{base_arch.upper()} ({base_arch}) base model '{base_model}'; use a {weights_arch} base model "
        f"(components.base_model) or weights trained on {base_arch}"
    )


def mismatch_hint(base_arch: str) -> str:
    """Appended to a key-mismatch error of weights that record no architecture."""
    other = "sdxl" if base_arch == "sd15" else "sd15"
    return (f" (the base model is {base_arch}; weights trained on {other} do not fit its UNet: "
            f"check components.base_model)")
