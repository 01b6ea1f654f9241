"""Install UniPortrait's adapters on any diffusers UNet2DConditionModel; select, save and load them.

- `install_faceid_processors`: FaceIDAttnProcessor on every cross-attention (attn2), copy-initialised
  from the layer's to_k / to_v; SelfAttnProcessor (stock, accepts `faceid`) everywhere else.
- `add_routers`: stage 2 routers on the installed processors.
- `add_lora` / `set_active_lora`: named peft LoRA sets (single_id, multi_id) on to_q, to_k, to_v,
  to_out.0 of every attention; exactly one active at a time (or none).
- `set_trainable` + `faceid_parameters` / `router_parameters` / `lora_parameters`: explicit
  requires_grad control and named-parameter selection (names are `unet.named_parameters()` names).
- `adapter_state_dict` / `load_adapter_state_dict` / `save_safetensors` / `load_safetensors`.

Dimensions are read from each Attention module (no SD1.5 constants), so SDXL-shaped UNets work.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from src.models.faceid_attention import FaceIDAttnProcessor, SelfAttnProcessor, base_linear

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

__all__ = [
    "LORA_TARGETS",
    "SINGLE",
    "MULTI",
    "PROCESSOR_SUFFIX",
    "install_faceid_processors",
    "faceid_processors",
    "add_routers",
    "add_lora",
    "lora_names",
    "set_active_lora",
    "set_trainable",
    "faceid_parameters",
    "router_parameters",
    "lora_parameters",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_safetensors",
    "load_safetensors",
]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SINGLE, MULTI = "single_id", "multi_id"  # the two LoRA adapters' names: stage 1 / single-ID, stage 2 / multi-ID
PROCESSOR_SUFFIX = ".processor"  # attn_processors keys are "<attention module path>.processor"


def _attention_of(unet: nn.Module, processor_name: str) -> Attention:
    """The Attention module owning the processor `processor_name` (an attn_processors key)."""
    module = unet.get_submodule(processor_name[: -len(PROCESSOR_SUFFIX)])
    if not isinstance(module, Attention):
        raise TypeError(
            f"{processor_name}: expected its parent to be a diffusers Attention, got {type(module).__name__}"
        )
    return module


def install_faceid_processors(
    unet: UNet2DConditionModel,
    id_dim: int | None = None,
    num_tokens: int = 16,
    with_router: bool = False,
    value_init: str = "copy",
) -> list[str]:
    """Replace every attention processor of `unet`; return the names of the face-ID (attn2) ones.

    Face-ID processors go on cross-attention layers named `...attn2.processor`; every other
    attention gets SelfAttnProcessor (stock maths, accepts `faceid`).

    Args:
        unet: a diffusers UNet2DConditionModel (any shape) with stock processors.
        id_dim: width of the identity tokens; None = each layer's cross-attention dim (to_k input).
        num_tokens: tokens per identity (16).
        with_router: also create the routers (stage 2).
        value_init: "copy" copies to_k/to_v into to_k_faceid/to_v_faceid (IP-Adapter practice);
            "zero" copies to_k but zero-initialises to_v_faceid, so an untrained adapter leaves the
            base UNet's output exactly unchanged (its gradient is still non-zero: the attention
            weights are not) and identity only enters through what training puts there.
    Each processor gets `name` = its `unet.attn_processors` key (used in RoutingRecord.names).
    """
    processors: dict[str, object] = {}
    installed: list[str] = []
    for name, old in unet.attn_processors.items():
        if isinstance(old, (FaceIDAttnProcessor, SelfAttnProcessor)):
            raise ValueError(f"{name}: face-ID processors are already installed on this UNet")
        if not isinstance(old, (AttnProcessor, AttnProcessor2_0)):
            raise TypeError(f"{name}: unsupported existing processor {type(old).__name__} (expected a stock one)")
        attn = _attention_of(unet, name)
        proc: FaceIDAttnProcessor | SelfAttnProcessor
        if name.endswith("attn2" + PROCESSOR_SUFFIX) and attn.is_cross_attention:
            to_q, to_k = base_linear(attn.to_q), base_linear(attn.to_k)
            proc = FaceIDAttnProcessor(
                hidden_size=to_k.out_features,
                id_dim=to_k.in_features if id_dim is None else id_dim,
                num_tokens=num_tokens,
                with_router=with_router,
                query_dim=to_q.in_features,
            ).to(device=to_k.weight.device, dtype=to_k.weight.dtype)
            proc.init_from_attention(attn)
            if value_init == "zero":
                torch.nn.init.zeros_(proc.to_v_faceid.weight)
            elif value_init != "copy":
                raise ValueError(f"value_init must be 'copy' or 'zero', got {value_init!r}")
            installed.append(name)
        else:
            proc = SelfAttnProcessor()
        proc.name = name
        processors[name] = proc
    unet.set_attn_processor(processors)
    return installed


def faceid_processors(unet: nn.Module) -> dict[str, FaceIDAttnProcessor]:
    """Installed face-ID processors keyed by module path (= their attn_processors key)."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, FaceIDAttnProcessor)}


def add_routers(unet: nn.Module) -> None:
    """Add an IDRouter to every installed face-ID processor that has none (stage 2)."""
    procs = faceid_processors(unet)
    if not procs:
        raise ValueError("add_routers: no FaceIDAttnProcessor installed; call install_faceid_processors first")
    for proc in procs.values():
        proc.add_router()


def _snapshot_requires_grad(unet: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """requires_grad of every parameter, keyed by the Parameter object (peft renames wrapped
    weights, e.g. `to_q.weight` -> `to_q.base_layer.weight`, but keeps the objects)."""
    return [(p, p.requires_grad) for p in unet.parameters()]


def _restore_requires_grad(unet: nn.Module, saved: list[tuple[nn.Parameter, bool]]) -> None:
    """Restore saved flags; parameters that did not exist before (new LoRA) are frozen."""
    flags = {id(p): flag for p, flag in saved}
    for p in unet.parameters():
        p.requires_grad_(flags.get(id(p), False))


def lora_names(unet: nn.Module) -> list[str]:
    """Names of the LoRA adapters added to `unet`."""
    return list(getattr(unet, "peft_config", {}) or {})


def add_lora(unet: UNet2DConditionModel, name: str, rank: int, init_from: str | None = None) -> None:
    """Add a peft LoRA set `name` (rank r, alpha r -> scale 1) on to_q/to_k/to_v/to_out.0 of every attention.

    peft inits A randomly and B to zero (the adapter starts as identity). `add_adapter` freezes every
    other parameter; the previous requires_grad flags are restored here and the new LoRA parameters
    are frozen (use `set_trainable`). `init_from` copies another adapter's LoRA weights into the new
    one (stage 2's multi_id starts from single_id). The new adapter becomes the active one.
    """
    existing = lora_names(unet)
    if name in existing:
        raise ValueError(f"add_lora: adapter {name!r} already exists (have {existing})")
    if init_from is not None and init_from not in existing:
        raise ValueError(f"add_lora: init_from={init_from!r} is not an adapter of this UNet (have {existing})")
    saved = _snapshot_requires_grad(unet)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=True)
    with warnings.catch_warnings():
        # peft warns whenever a second adapter is added; several named sets are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=name)
    if init_from is not None:
        _copy_lora(unet, src=init_from, dst=name)
    set_active_lora(unet, name)
    _restore_requires_grad(unet, saved)


@torch.no_grad()
def _copy_lora(unet: nn.Module, src: str, dst: str) -> None:
    """Copy LoRA A/B weights of adapter `src` into adapter `dst` in every LoRA layer."""
    for mod_name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or src not in module.lora_A:
            continue
        for bank in (module.lora_A, module.lora_B):
            w_src, w_dst = bank[src].weight, bank[dst].weight
            if w_src.shape != w_dst.shape:
                raise ValueError(
                    f"add_lora: cannot init {dst!r} from {src!r} at {mod_name}: shapes {tuple(w_src.shape)} vs "
                    f"{tuple(w_dst.shape)} (different ranks?)"
                )
            w_dst.copy_(w_src)


def set_active_lora(unet: UNet2DConditionModel, name: str | None) -> None:
    """Activate exactly one LoRA set (`name`) or none (None: base weights exactly).

    peft toggles requires_grad when (de)activating; the flags are restored, so trainability is
    only ever decided by `set_trainable`.
    """
    names = lora_names(unet)
    if name is None:
        if names:
            saved = _snapshot_requires_grad(unet)
            unet.disable_adapters()
            _restore_requires_grad(unet, saved)
        return
    if name not in names:
        raise ValueError(f"set_active_lora: no LoRA adapter named {name!r} (have {names})")
    saved = _snapshot_requires_grad(unet)
    unet.enable_adapters()
    unet.set_adapter(name)
    _restore_requires_grad(unet, saved)


def faceid_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """to_k_faceid / to_v_faceid parameters of every face-ID processor, by full parameter name."""
    return {
        f"{prefix}.{n}": p
        for prefix, proc in faceid_processors(unet).items()
        for n, p in proc.named_parameters()
        if not n.startswith("router.")
    }


def router_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """Router parameters (to_q_router, to_k_router, aggr_router) of every processor, by full name."""
    return {
        f"{prefix}.{n}": p
        for prefix, proc in faceid_processors(unet).items()
        for n, p in proc.named_parameters()
        if n.startswith("router.")
    }


def lora_parameters(unet: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Parameters of LoRA adapter `name` (lora_A.<name>.weight, lora_B.<name>.weight), by full name."""
    pattern = re.compile(rf"\.lora_(A|B)\.{re.escape(name)}\.")
    return {n: p for n, p in unet.named_parameters() if pattern.search(n)}


def set_trainable(unet: nn.Module, faceid: bool, router: bool, lora: str | None) -> None:
    """Freeze the whole UNet, then unfreeze the face-ID projections, routers and/or one LoRA set."""
    unet.requires_grad_(False)
    groups: list[tuple[str, dict[str, nn.Parameter]]] = []
    if faceid:
        groups.append(("faceid", faceid_parameters(unet)))
    if router:
        groups.append(("router", router_parameters(unet)))
    if lora is not None:
        groups.append((f"lora {lora!r}", lora_parameters(unet, lora)))
    for label, params in groups:
        if not params:
            raise ValueError(f"set_trainable: no {label} parameters in this UNet (not installed/added?)")
        for p in params.values():
            p.requires_grad_(True)


def _select(unet: nn.Module, include: Sequence[str]) -> dict[str, nn.Parameter]:
    """Union of parameter groups: 'faceid', 'router', 'lora' (every adapter) or 'lora:<name>'."""
    out: dict[str, nn.Parameter] = {}
    for group in include:
        if group == "faceid":
            out.update(faceid_parameters(unet))
        elif group == "router":
            out.update(router_parameters(unet))
        elif group == "lora":
            for name in lora_names(unet):
                out.update(lora_parameters(unet, name))
        elif group.startswith("lora:"):
            name = group.split(":", 1)[1]
            if name not in lora_names(unet):
                raise ValueError(f"include entry {group!r}: no LoRA adapter {name!r} (have {lora_names(unet)})")
            out.update(lora_parameters(unet, name))
        else:
            raise ValueError(f"include entry {group!r} is not one of 'faceid', 'router', 'lora', 'lora:<name>'")
    return out


def adapter_state_dict(
    unet: nn.Module, include: Sequence[str] = ("faceid", "router", "lora")
) -> dict[str, torch.Tensor]:
    """Detached copies of the selected adapter parameters, keyed by `unet.named_parameters()` names.

    include: any of 'faceid', 'router', 'lora' (all LoRA sets), 'lora:<name>' (one set).
    """
    return {k: p.detach().clone() for k, p in _select(unet, include).items()}


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@torch.no_grad()
def load_adapter_state_dict(
    unet: nn.Module,
    sd: dict[str, torch.Tensor],
    strict: bool = True,
    include: Sequence[str] = ("faceid", "router", "lora"),
) -> tuple[list[str], list[str]]:
    """Copy `sd` into the selected adapter parameters; return (missing, unexpected) keys.

    strict: raise when a selected parameter is missing from `sd` or `sd` holds a key that is not a
    selected parameter. A shape mismatch always raises.
    """
    params = _select(unet, include)
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    if strict and (missing or unexpected):
        raise KeyError(
            f"load_adapter_state_dict (include={tuple(include)}): {len(missing)} missing keys "
            f"[{_format_keys(missing)}]; {len(unexpected)} unexpected keys [{_format_keys(unexpected)}]"
        )
    for key, value in sd.items():
        if key not in params:
            continue
        param = params[key]
        if param.shape != value.shape:
            raise ValueError(
                f"load_adapter_state_dict: {key} has shape {tuple(value.shape)}, the UNet expects {tuple(param.shape)}"
            )
        param.copy_(value.to(device=param.device, dtype=param.dtype))
    return missing, unexpected


def save_safetensors(path: str | Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a flat tensor dict as safetensors (contiguous CPU copies); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path), metadata=metadata)


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a tensor dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_safetensors: no such file {path}")
    return load_file(str(path), device=device)
