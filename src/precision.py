"""Frozen weights in a lower precision (`model.frozen_dtype`), the trainable adapters in fp32.

What the diffusers training examples do under mixed precision: the frozen base networks (UNet base weights,
VAE, text encoder, and here the face backbone and CLIP tower) are stored in bf16 or fp16, which halves their
memory and the weight traffic of every forward, while the trained parameters (LoRA, face-ID projections,
routers, the ID embedding) stay fp32 so the optimizer's small updates are not rounded away. Mixed weight
dtypes need autocast around every forward: `frozen_autocast` gives it to the module's own forwards (training
step, probes, sampling), so they work inside and outside Lightning's precision context alike.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from src.models import adapters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_frozen_dtype(name: str) -> torch.dtype:
    """`model.frozen_dtype` -> torch dtype; an unknown name is an error naming the key and the choices."""
    if name not in DTYPES:
        raise ValueError(f"model.frozen_dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def cast_frozen(modules: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """Cast the frozen base networks' floating parameters and buffers to `dtype`, in place (before the
    adapters are installed: `adapters_to` then lifts whatever copied the base dtype). A VAE whose config
    sets `force_upcast` stays fp32 under float16 (bfloat16 has fp32's range: cast)."""
    if dtype == torch.float32:
        return
    for m in modules:
        if dtype == torch.float16 and getattr(getattr(m, "config", None), "force_upcast", False):
            continue  # a VAE that overflows in float16 (SDXL's, its config says so) stays fp32
        m.to(dtype=dtype)


def adapters_to(unet: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Every adapter parameter of `unet` (face-ID projections, LoRA sets, routers) in `dtype`, in place.

    `to_k_faceid` starts as a copy of the base `to_k`, and peft may create LoRA weights in the base layer's
    dtype; trained weights must be fp32 whatever the frozen dtype (or the dtype Lightning's precision made
    the other adapters, for those added at the stage switch, e.g. fp64 under `64-true`)."""
    params = {**adapters.faceid_parameters(unet), **adapters.router_parameters(unet)}
    for name in adapters.lora_names(unet):
        params.update(adapters.lora_parameters(unet, name))
    for p in params.values():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@contextlib.contextmanager
def frozen_autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to `dtype` on `device` when the frozen weights are not fp32 (a no-op otherwise)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
