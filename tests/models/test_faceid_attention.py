"""FaceIDAttnProcessor / SelfAttnProcessor on a standalone diffusers Attention layer."""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from src.models.context import FaceIDContext, RoutingRecord
from src.models.faceid_attention import FaceIDAttnProcessor, SelfAttnProcessor, layer_hw

QDIM, TDIM, HEADS, HEAD_DIM, T = 32, 16, 4, 8, 4
LAT_HW = (4, 6)  # non-square on purpose (catches h/w swaps)
L = 24


def _layer(seed: int = 0, **kwargs) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(query_dim=QDIM, cross_attention_dim=TDIM, heads=HEADS, dim_head=HEAD_DIM, out_bias=True, **kwargs)
    return attn.eval()


def _proc(attn: Attention, with_router: bool = False, seed: int = 1) -> FaceIDAttnProcessor:
    torch.manual_seed(seed)
    proc = FaceIDAttnProcessor(hidden_size=HEADS * HEAD_DIM, id_dim=TDIM, num_tokens=T, with_router=with_router)
    proc.name = "layer"
    # random (not copy-initialised) projections so face-ID and text attention clearly differ
    return proc


def _inputs(b: int = 2, n: int = 2, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, L, QDIM, generator=g), torch.randn(b, 7, TDIM, generator=g),
            torch.randn(b, n, T, TDIM, generator=g))


def _run(attn: Attention, proc, hidden, text, ctx: FaceIDContext | None) -> torch.Tensor:
    attn.set_processor(proc)
    return attn(hidden, encoder_hidden_states=text, faceid=ctx)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H*d) -> (B, H, S, d)."""
    return x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, the formula the processor is checked against: (B, H, S, d) -> (B, S, H*d)."""
    a = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM**0.5, dim=-1) @ v
    return a.transpose(1, 2).reshape(q.shape[0], -1, HEADS * HEAD_DIM)


def test_layer_hw() -> None:
    assert layer_hw((64, 64), 4096) == (64, 64)
    assert layer_hw((64, 64), 256) == (16, 16)
    assert layer_hw((64, 96), 24) == (4, 6)
    assert layer_hw((9, 9), 25) == (5, 5)  # ceil-halving, as stride-2 convs with padding 1
    with pytest.raises(ValueError, match="latent_hw"):
        layer_hw((64, 64), 30)


def test_processors_name_faceid_in_their_signature() -> None:
    # diffusers drops (and warns about) kwargs a processor's __call__ does not name
    assert "faceid" in inspect.signature(_proc(_layer()).__call__).parameters
    assert "faceid" in inspect.signature(SelfAttnProcessor().__call__).parameters


@pytest.mark.parametrize("kwargs", [{}, {"residual_connection": True, "rescale_output_factor": 2.0}])
def test_no_faceid_or_zero_scale_is_bit_identical_to_stock(kwargs: dict) -> None:
    attn = _layer(**kwargs)
    hidden, text, tokens = _inputs()
    attn.set_processor(AttnProcessor2_0())
    stock = attn(hidden, encoder_hidden_states=text)
    proc = _proc(attn, with_router=True)
    assert torch.equal(_run(attn, proc, hidden, text, None), stock)
    zero = FaceIDContext(tokens=tokens, latent_hw=LAT_HW, scale=0.0)
    assert torch.equal(_run(attn, proc, hidden, text, zero), stock)
    # 4-D input path with group norm (as the UNet's mid-block attention may use)
    torch.manual_seed(0)
    attn4 = Attention(query_dim=QDIM, heads=HEADS, dim_head=HEAD_DIM, norm_num_groups=4,
                      residual_connection=True).eval()
    x4 = torch.randn(2, QDIM, 4, 6)
    attn4.set_processor(AttnProcessor2_0())
    stock4 = attn4(x4)
    assert torch.equal(_run(attn4, SelfAttnProcessor(), x4, None, zero), stock4)
    assert torch.equal(_run(attn4, _proc(attn4), x4, None, None), stock4)
    # ... and the face-ID branch works on the 4-D path too (changes the output)
    ctx4 = FaceIDContext(tokens=tokens[:, :1], latent_hw=(4, 6), scale=1.0)
    assert not torch.allclose(_run(attn4, _proc(attn4), x4, None, ctx4), stock4)


def test_single_identity_matches_explicit_formula() -> None:
    attn = _layer()
    proc = _proc(attn)
    hidden, text, tokens = _inputs(n=1)
    out = _run(attn, proc, hidden, text, FaceIDContext(tokens=tokens, latent_hw=LAT_HW, scale=0.7))

    q = _heads(attn.to_q(hidden))
    text_part = _attend(q, _heads(attn.to_k(text)), _heads(attn.to_v(text)))
    face_part = _attend(q, _heads(proc.to_k_faceid(tokens[:, 0])), _heads(proc.to_v_faceid(tokens[:, 0])))
    expected = attn.to_out[0](text_part + 0.7 * face_part)  # combined BEFORE to_out (bias once)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_weighted_identities_match_separate_attentions() -> None:
    """Fractional per-position weights (explicit masks): the fused face-ID attention equals
    sum_n w_n * Attn(q, F_id(n)), each identity's softmax taken over its own tokens only."""
    attn = _layer()
    proc = _proc(attn)
    hidden, text, tokens = _inputs(n=3)
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(2, 3, *LAT_HW, generator=g)  # at the layer's resolution: no resizing
    out = _run(attn, proc, hidden, text, FaceIDContext(tokens=tokens, latent_hw=LAT_HW, masks=masks, scale=0.8))

    q = _heads(attn.to_q(hidden))
    w = (masks / masks.sum(1, keepdim=True)).flatten(2).transpose(1, 2)  # (B, L, N)
    per_id = [_attend(q, _heads(proc.to_k_faceid(tokens[:, n])), _heads(proc.to_v_faceid(tokens[:, n])))
              for n in range(3)]
    face = sum(w[:, :, n, None] * per_id[n] for n in range(3))
    expected = attn.to_out[0](_attend(q, _heads(attn.to_k(text)), _heads(attn.to_v(text))) + 0.8 * face)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_router_argmax_selects_one_identity_per_position() -> None:
    attn = _layer()
    proc = _proc(attn, with_router=True)
    hidden, text, tokens = _inputs(n=3)
    record = RoutingRecord()
    ctx = FaceIDContext(tokens=tokens, latent_hw=LAT_HW, scale=1.0, record=record)
    out = _run(attn, proc, hidden, text, ctx)
    singles = torch.stack(
        [_run(attn, proc, hidden, text, FaceIDContext(tokens=tokens[:, n : n + 1], latent_hw=LAT_HW))
         for n in range(3)],
        dim=2,
    )  # (B, L, N, C)
    choice = proc.router.logits(hidden, tokens).argmax(-1)  # (B, L)
    expected = singles.gather(2, choice[:, :, None, None].expand(-1, -1, 1, QDIM)).squeeze(2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(choice.unique()) > 1  # the test is not trivially one identity everywhere
    # the record holds this layer's maps at (h, w) = (4, 6)
    assert record.names == ["layer"]
    assert record.probs[0].shape == (2, 3, 4, 6) and record.hard[0].shape == (2, 3, 4, 6)
    assert torch.equal(record.hard[0].argmax(1), choice.view(2, 4, 6))
    torch.testing.assert_close(record.probs[0].sum(1), torch.ones(2, 4, 6))


def test_padded_identities_are_never_routed_to() -> None:
    attn = _layer()
    proc = _proc(attn, with_router=True)
    hidden, text, tokens = _inputs(n=2)
    valid = torch.tensor([[True, False], [True, False]])
    for tau in (None, 0.5):
        ctx = FaceIDContext(tokens=tokens, latent_hw=LAT_HW, valid=valid, gumbel_tau=tau)
        out = _run(attn, proc, hidden, text, ctx)
        single = _run(attn, proc, hidden, text, FaceIDContext(tokens=tokens[:, :1], latent_hw=LAT_HW))
        torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-6)


def test_explicit_masks_override_routing() -> None:
    attn = _layer()
    proc = _proc(attn, with_router=True)
    hidden, text, tokens = _inputs(n=2)
    masks = torch.zeros(2, 2, 16, 24)
    masks[:, 0] = 1.0  # identity 0 everywhere
    record = RoutingRecord()
    out = _run(attn, proc, hidden, text, FaceIDContext(tokens=tokens, latent_hw=LAT_HW, masks=masks, record=record))
    single = _run(attn, proc, hidden, text, FaceIDContext(tokens=tokens[:, :1], latent_hw=LAT_HW))
    torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-6)
    assert record.names == []  # the router did not run


def test_mask_weights_are_normalised_over_identities_and_zero_elsewhere() -> None:
    proc = _proc(_layer())
    hidden, _, tokens = _inputs(n=2)
    masks = torch.zeros(2, 2, 4, 6)
    masks[:, 0, :, :3] = 1
    masks[:, 1, :, 2:4] = 1  # column 2 shared by both, columns 4-5 by none
    w = proc.routing_weights(hidden, tokens, FaceIDContext(tokens=tokens, latent_hw=LAT_HW, masks=masks))
    w = w.view(2, 4, 6, 2)
    assert torch.equal(w[:, :, 0, 0], torch.ones(2, 4)) and torch.equal(w[:, :, 2], torch.full((2, 4, 2), 0.5))
    assert torch.equal(w[:, :, 3, 1], torch.ones(2, 4)) and torch.equal(w[:, :, 4:], torch.zeros(2, 4, 2, 2))


def test_multiple_identities_without_router_is_an_error() -> None:
    attn = _layer()
    hidden, text, tokens = _inputs(n=2)
    with pytest.raises(ValueError, match="no router"):
        _run(attn, _proc(attn), hidden, text, FaceIDContext(tokens=tokens, latent_hw=LAT_HW))


def test_gumbel_training_weights_sum_to_one_and_carry_gradient_to_router() -> None:
    attn = _layer()
    proc = _proc(attn, with_router=True)
    hidden, text, tokens = _inputs(n=3)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    record = RoutingRecord()
    ctx = FaceIDContext(tokens=tokens, latent_hw=LAT_HW, valid=valid, gumbel_tau=1.0, record=record)
    out = _run(attn, proc, hidden, text, ctx)
    hard = record.hard[0]  # (B, N, h, w)
    assert torch.equal(hard.sum(1), torch.ones(2, 4, 6))
    assert torch.all(hard[1, 2] == 0)
    out.square().sum().backward()
    for name in ("to_q_router.0.weight", "to_k_router.2.weight", "aggr_router.weight"):
        assert proc.router.get_parameter(name).grad.abs().sum() > 0, name


def test_init_from_attention_copies_text_projections_when_shapes_match() -> None:
    attn = _layer()
    proc = _proc(attn)
    assert proc.init_from_attention(attn)
    assert torch.equal(proc.to_k_faceid.weight, attn.to_k.weight)
    assert torch.equal(proc.to_v_faceid.weight, attn.to_v.weight)
    other = FaceIDAttnProcessor(hidden_size=HEADS * HEAD_DIM, id_dim=TDIM + 1, num_tokens=T)
    before = other.to_k_faceid.weight.clone()
    assert not other.init_from_attention(attn)
    assert torch.equal(other.to_k_faceid.weight, before)


@pytest.mark.parametrize("case", ["one_id", "routed_gumbel_recorded", "routed_argmax", "masks"])
def test_processor_traces_into_one_graph_without_breaks(case: str) -> None:
    """torch.compile of a UNet with these processors needs no graph break in the face-ID branch."""
    import torch._dynamo

    n = 1 if case == "one_id" else 2
    attn = _layer()
    attn.set_processor(_proc(attn, with_router=case.startswith("routed")))
    hidden, text, tokens = _inputs(n=n)
    valid = torch.ones(2, n, dtype=torch.bool)
    masks = torch.rand(2, n, 8, 12) if case == "masks" else None

    def forward(hidden, text, tokens, valid):
        ctx = FaceIDContext(tokens=tokens, latent_hw=LAT_HW, valid=valid, masks=masks,
                            gumbel_tau=1.0 if case == "routed_gumbel_recorded" else None,
                            record=RoutingRecord() if case == "routed_gumbel_recorded" else None)
        return attn(hidden, encoder_hidden_states=text, faceid=ctx)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(hidden, text, tokens, valid)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1
