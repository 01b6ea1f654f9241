"""Adapters on tiny SD1.5- and SDXL-shaped UNets: processors, routers, peft LoRA, selection, save/load."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from src.models.adapters import (
    adapter_state_dict,
    add_lora,
    add_routers,
    faceid_parameters,
    install_faceid_processors,
    load_adapter_state_dict,
    load_safetensors,
    lora_parameters,
    router_parameters,
    save_safetensors,
    set_active_lora,
    set_trainable,
)
from src.models.context import FaceIDContext, RoutingRecord
from src.models.faceid_attention import FaceIDAttnProcessor, SelfAttnProcessor
from tests.models.tiny_unets import tiny_sd15_unet, tiny_sdxl_unet, unet_inputs


def _tokens(unet: nn.Module, b: int = 2, n: int = 1, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 16, unet.config.cross_attention_dim, generator=g)  # (B, N, 16, D)


def _forward(unet: nn.Module, inputs: dict, ctx: FaceIDContext | None = None) -> torch.Tensor:
    kwargs = None if ctx is None else {"faceid": ctx}
    with torch.no_grad():
        return unet(**inputs, cross_attention_kwargs=kwargs).sample


@torch.no_grad()
def _perturb_lora(unet: nn.Module, name: str, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for key, p in lora_parameters(unet, name).items():
        if ".lora_B." in key:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture()
def sd15() -> nn.Module:
    return tiny_sd15_unet().eval()


def test_install_puts_faceid_on_cross_attention_only_copy_initialised(sd15: nn.Module) -> None:
    names = install_faceid_processors(sd15)
    procs = sd15.attn_processors
    assert names == [n for n in procs if n.endswith("attn2.processor")] and len(names) == 4
    for name, proc in procs.items():
        assert proc.name == name
        assert isinstance(proc, FaceIDAttnProcessor if name in names else SelfAttnProcessor)
    mid = sd15.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")
    assert torch.equal(mid.processor.to_k_faceid.weight, mid.to_k.weight)  # (64, 32) at the mid block
    assert torch.equal(mid.processor.to_v_faceid.weight, mid.to_v.weight)
    with pytest.raises(ValueError, match="already installed"):
        install_faceid_processors(sd15)


def test_output_equals_base_without_faceid_and_differs_with_it(sd15: nn.Module) -> None:
    base = copy.deepcopy(sd15)
    inputs = unet_inputs(sd15)
    expected = _forward(base, inputs)
    install_faceid_processors(sd15)
    assert torch.equal(_forward(sd15, inputs), expected)
    tokens = _tokens(sd15)
    assert torch.equal(_forward(sd15, inputs, FaceIDContext(tokens=tokens, latent_hw=(8, 8), scale=0.0)), expected)
    with_id = _forward(sd15, inputs, FaceIDContext(tokens=tokens, latent_hw=(8, 8), scale=0.7))
    assert not torch.allclose(with_id, expected)


def test_sdxl_shaped_forward_and_backward_reach_faceid_projections() -> None:
    unet = tiny_sdxl_unet()
    names = install_faceid_processors(unet)
    assert len(names) == 8  # transformer depth 2 in the cross-attention blocks
    add_lora(unet, "single_id", rank=4)
    set_trainable(unet, faceid=True, router=False, lora="single_id")  # stage-1 setup
    inputs = unet_inputs(unet, hw=(8, 8))
    out = unet(**inputs,
               cross_attention_kwargs={"faceid": FaceIDContext(tokens=_tokens(unet), latent_hw=(8, 8))}).sample
    out.square().mean().backward()
    for key, p in faceid_parameters(unet).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
    lora_b = {k: p for k, p in lora_parameters(unet, "single_id").items() if ".lora_B." in k}
    assert len(lora_b) == 16 * 4  # 16 attentions x (to_q, to_k, to_v, to_out.0)
    for key, p in lora_b.items():  # B gets gradient (A does not yet: B is zero-initialised)
        assert p.grad is not None and p.grad.abs().sum() > 0, key
    assert all(p.grad is None for n, p in unet.named_parameters() if not p.requires_grad)
    # ... and an optimizer step over exactly the trainable parameters moves them, and only them
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0).step()
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in unet.named_parameters() if p.requires_grad and p.grad.abs().sum() > 0}
    assert set(faceid_parameters(unet)) <= moved


@pytest.mark.parametrize("factory,sizes", [
    (tiny_sd15_unet, {(8, 12): 3, (4, 6): 1}),
    (tiny_sdxl_unet, {(4, 6): 8}),
])
def test_routing_record_has_one_entry_per_cross_attention_layer(factory, sizes: dict) -> None:
    torch.manual_seed(0)
    unet = factory().eval()
    names = install_faceid_processors(unet, with_router=True)
    record = RoutingRecord()
    ctx = FaceIDContext(tokens=_tokens(unet, n=2), latent_hw=(8, 12), gumbel_tau=1.0, record=record)
    unet(**unet_inputs(unet, hw=(8, 12)), cross_attention_kwargs={"faceid": ctx})
    assert sorted(record.names) == sorted(names)
    got: dict[tuple[int, int], int] = {}
    for probs, hard in zip(record.probs, record.hard):
        assert probs.shape[:2] == (2, 2) and hard.shape == probs.shape
        got[tuple(probs.shape[-2:])] = got.get(tuple(probs.shape[-2:]), 0) + 1
    assert got == sizes


def test_add_routers_after_install_and_router_parameter_selection(sd15: nn.Module) -> None:
    install_faceid_processors(sd15)
    assert router_parameters(sd15) == {}
    add_routers(sd15)
    keys = list(router_parameters(sd15))
    assert len(keys) == 4 * 8  # 4 layers x (to_q_router 3 + to_k_router 3 + aggr_router 2)
    assert all(".attn2.processor.router." in k for k in keys)
    assert not set(keys) & set(faceid_parameters(sd15))


def test_lora_changes_output_only_when_active_and_nonzero(sd15: nn.Module) -> None:
    inputs = unet_inputs(sd15)
    base = _forward(sd15, inputs)
    install_faceid_processors(sd15)
    add_lora(sd15, "single_id", rank=4)
    assert torch.equal(_forward(sd15, inputs), base)  # peft inits B = 0
    _perturb_lora(sd15, "single_id")
    with_lora = _forward(sd15, inputs)
    assert not torch.allclose(with_lora, base)
    set_active_lora(sd15, None)
    assert torch.equal(_forward(sd15, inputs), base)
    set_active_lora(sd15, "single_id")
    assert torch.equal(_forward(sd15, inputs), with_lora)
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        set_active_lora(sd15, "nope")


def test_only_one_lora_active_and_multi_id_initialised_from_single_id(sd15: nn.Module) -> None:
    inputs = unet_inputs(sd15)
    install_faceid_processors(sd15)
    add_lora(sd15, "single_id", rank=4)
    _perturb_lora(sd15, "single_id")
    single_out = _forward(sd15, inputs)
    add_lora(sd15, "multi_id", rank=4, init_from="single_id")
    single, multi = lora_parameters(sd15, "single_id"), lora_parameters(sd15, "multi_id")
    assert len(single) == len(multi) > 0
    for key, p in single.items():
        assert torch.equal(multi[key.replace(".single_id.", ".multi_id.")], p)
    assert torch.equal(_forward(sd15, inputs), single_out)  # multi active, same weights
    _perturb_lora(sd15, "multi_id", seed=9)
    multi_out = _forward(sd15, inputs)
    assert not torch.allclose(multi_out, single_out)  # single_id is not also applied
    set_active_lora(sd15, "single_id")
    assert torch.equal(_forward(sd15, inputs), single_out)


def test_add_lora_restores_requires_grad_and_freezes_new_lora(sd15: nn.Module) -> None:
    install_faceid_processors(sd15, with_router=True)
    sd15.requires_grad_(False)
    faceid = faceid_parameters(sd15)
    k_keys = [k for k in faceid if "to_k_faceid" in k]
    for k in k_keys:
        faceid[k].requires_grad_(True)
    sd15.conv_in.weight.requires_grad_(True)
    to_q = sd15.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
    to_q.requires_grad_(True)  # a weight peft will wrap (and rename to ...to_q.base_layer.weight)
    before = [(p, p.requires_grad) for p in sd15.parameters()]
    add_lora(sd15, "single_id", rank=4)
    assert [(p, p.requires_grad) for p, _ in before] == before
    assert to_q.requires_grad and all(faceid[k].requires_grad for k in k_keys)
    lora = lora_parameters(sd15, "single_id")
    assert lora and all(not p.requires_grad for p in lora.values())
    after = {n: p.requires_grad for n, p in sd15.named_parameters()}
    set_active_lora(sd15, None)
    set_active_lora(sd15, "single_id")
    assert {n: p.requires_grad for n, p in sd15.named_parameters()} == after


def test_lora_does_not_wrap_processor_linears(sd15: nn.Module) -> None:
    install_faceid_processors(sd15, with_router=True)
    add_lora(sd15, "single_id", rank=4)
    wrapped = [n for n, m in sd15.named_modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == 8 * 4  # every attention's to_q, to_k, to_v, to_out.0
    assert not [n for n in wrapped if ".processor." in n]
    for proc in sd15.attn_processors.values():
        if isinstance(proc, FaceIDAttnProcessor):
            for module in (proc.to_k_faceid, proc.to_v_faceid, *proc.router.modules()):
                assert not isinstance(module, LoraLayer)
            assert type(proc.to_k_faceid) is nn.Linear


def test_set_trainable_selects_exactly_the_requested_groups(sd15: nn.Module) -> None:
    install_faceid_processors(sd15, with_router=True)
    add_lora(sd15, "single_id", rank=4)
    add_lora(sd15, "multi_id", rank=4)
    set_trainable(sd15, faceid=False, router=True, lora="multi_id")
    trainable = {n for n, p in sd15.named_parameters() if p.requires_grad}
    assert trainable == set(router_parameters(sd15)) | set(lora_parameters(sd15, "multi_id"))
    set_trainable(sd15, faceid=True, router=False, lora="single_id")
    trainable = {n for n, p in sd15.named_parameters() if p.requires_grad}
    assert trainable == set(faceid_parameters(sd15)) | set(lora_parameters(sd15, "single_id"))
    with pytest.raises(ValueError, match="lora 'nope'"):
        set_trainable(sd15, faceid=False, router=False, lora="nope")


def _full_adapters(seed: int) -> nn.Module:
    unet = tiny_sd15_unet().eval()
    install_faceid_processors(unet, with_router=True)
    add_lora(unet, "single_id", rank=4)
    add_lora(unet, "multi_id", rank=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(unet).keys():
            unet.get_parameter(p).normal_(0, 0.05)
    return unet


def test_state_dict_roundtrip_through_safetensors(tmp_path: Path) -> None:
    src, dst = _full_adapters(seed=1), _full_adapters(seed=2)
    inputs = unet_inputs(src)
    ctx = FaceIDContext(tokens=_tokens(src, n=2), latent_hw=(8, 8))
    assert not torch.allclose(_forward(src, inputs, ctx), _forward(dst, inputs, ctx))
    sd = adapter_state_dict(src)
    assert set(sd) == set(faceid_parameters(src)) | set(router_parameters(src)) | set(
        lora_parameters(src, "single_id")) | set(lora_parameters(src, "multi_id"))
    save_safetensors(tmp_path / "a" / "adapters.safetensors", sd)
    loaded = load_safetensors(tmp_path / "a" / "adapters.safetensors")
    assert load_adapter_state_dict(dst, loaded) == ([], [])
    for mode in ("multi_id", "single_id"):
        set_active_lora(src, mode)
        set_active_lora(dst, mode)
        assert torch.equal(_forward(src, inputs, ctx), _forward(dst, inputs, ctx))


def test_load_errors_name_missing_unexpected_and_mismatched_keys() -> None:
    unet = _full_adapters(seed=1)
    sd = adapter_state_dict(unet, include=("faceid", "lora:single_id"))
    assert not any(".router." in k or ".multi_id." in k for k in sd)
    first = sorted(sd)[0]
    partial = dict(sd)
    del partial[first]
    partial["bogus.key"] = torch.zeros(1)
    with pytest.raises(KeyError, match="bogus.key") as err:
        load_adapter_state_dict(unet, partial, include=("faceid", "lora:single_id"))
    assert first in str(err.value)
    missing, unexpected = load_adapter_state_dict(unet, partial, strict=False, include=("faceid", "lora:single_id"))
    assert missing == [first] and unexpected == ["bogus.key"]
    bad = dict(sd)
    bad[first] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(unet, bad, include=("faceid", "lora:single_id"))
    with pytest.raises(ValueError, match="include entry"):
        adapter_state_dict(unet, include=("loras",))
    with pytest.raises(FileNotFoundError):
        load_safetensors("/nonexistent/x.safetensors")


def test_no_unexpected_kwarg_warning_once_installed(sd15: nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    inputs = unet_inputs(sd15)
    ctx = FaceIDContext(tokens=_tokens(sd15), latent_hw=(8, 8))
    with caplog.at_level(logging.WARNING):
        _forward(sd15, inputs, ctx)  # stock processors: diffusers warns about (and drops) `faceid`
    assert "not expected" in caplog.text
    caplog.clear()
    install_faceid_processors(sd15)
    with caplog.at_level(logging.WARNING):
        _forward(sd15, inputs, ctx)
    assert "not expected" not in caplog.text
