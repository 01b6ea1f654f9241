"""ID embedding module: released key layout, beta, multi-reference, DropPath/DropToken, mixing."""
from __future__ import annotations

import pytest
import torch

from src.models.id_embedding import IDEmbedding, PerceiverAttention, mix_identities

SMALL = dict(id_dim=24, structure_dim=40, width=32, output_dim=48, depth=2, num_queries=4, heads=4, dim_head=8)


def small(**kw: float) -> IDEmbedding:
    torch.manual_seed(0)
    return IDEmbedding(**{**SMALL, **kw})


def inputs(b: int = 3, refs: int = 1, ts: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, refs * 49, 24, generator=g), torch.randn(b, refs * ts, 40, generator=g)


def test_sd15_state_dict_matches_released_layout() -> None:
    with torch.device("meta"):
        m = IDEmbedding()
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = {
        "latents": (1, 16, 768),
        "proj_id.0.weight": (1024, 512),
        "proj_id.0.bias": (1024,),
        "proj_id.2.weight": (768, 1024),
        "proj_id.2.bias": (768,),
        "proj_clip.0.weight": (3456, 1728),
        "proj_clip.0.bias": (3456,),
        "proj_clip.2.weight": (768, 3456),
        "proj_clip.2.bias": (768,),
        "proj_out.weight": (768, 768),
        "proj_out.bias": (768,),
        "norm_out.weight": (768,),
        "norm_out.bias": (768,),
    }
    for i in range(6):
        for j in (0, 1):
            p = f"layers.{i}.{j}."
            expected.update({
                p + "norm1.weight": (768,), p + "norm1.bias": (768,),
                p + "norm2.weight": (768,), p + "norm2.bias": (768,),
                p + "to_q.weight": (768, 768), p + "to_kv.weight": (1536, 768), p + "to_out.weight": (768, 768),
            })
        expected.update({
            f"layers.{i}.2.0.weight": (768,), f"layers.{i}.2.0.bias": (768,),
            f"layers.{i}.2.1.weight": (3072, 768), f"layers.{i}.2.3.weight": (768, 3072),
        })
    assert sd == expected  # exact key set: no biases on to_q/to_kv/to_out or the FFN linears


def test_output_shape_and_beta() -> None:
    m = small().eval()
    r, s = inputs()
    out1 = m(r, s, beta=1.0)
    assert out1.shape == (3, 4, 48)
    out0 = m(r, s, beta=0.0)
    assert not torch.allclose(out0, out1)
    # beta = 0 removes the structure branch: structure features no longer matter
    assert torch.allclose(out0, m(r, torch.randn_like(s), beta=0.0), atol=1e-6)
    # per-sample beta tensor equals the per-sample scalar calls
    mixed = m(r, s, beta=torch.tensor([0.0, 1.0, 0.3]))
    assert torch.allclose(mixed[0], out0[0], atol=1e-6) and torch.allclose(mixed[1], out1[1], atol=1e-6)
    assert torch.allclose(mixed[2], m(r[2:], s[2:], beta=0.3)[0], atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        m(r, s, beta=torch.ones(2))


def test_multiple_references() -> None:
    m = small().eval()
    r1, s1 = inputs(refs=1, seed=1)
    r2, s2 = inputs(refs=1, seed=2)
    one = m(r1, s1)
    two = m(torch.cat([r1, r2], 1), torch.cat([s1, s2], 1))  # (B, 2*49, .), (B, 2*16, .)
    assert two.shape == one.shape == (3, 4, 48)
    assert not torch.allclose(one, two)
    # reference order does not matter (attention is permutation-invariant over feature tokens)
    swapped = m(torch.cat([r2, r1], 1), torch.cat([s2, s1], 1))
    assert torch.allclose(two, swapped, atol=1e-5)
    r3, s3 = inputs(refs=3, seed=3)
    assert m(r3, s3).shape == (3, 4, 48)


def test_eval_ignores_drop_settings() -> None:
    r, s = inputs()
    a = small(p_drop_path=0.0, p_drop_token=0.0).eval()
    b = small(p_drop_path=1.0, p_drop_token=0.0).eval()
    c = small(p_drop_path=0.0, p_drop_token=1.0, token_drop_rate=1.0).eval()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    out = a(r, s)
    assert torch.equal(out, b(r, s)) and torch.equal(out, c(r, s)) and torch.equal(out, a(r, s))


def test_train_drop_path_equals_beta_zero() -> None:
    r, s = inputs()
    m = small(p_drop_path=1.0, p_drop_token=0.0)
    ref = m.eval()(r, s, beta=0.0)
    torch.manual_seed(3)
    dropped = m.train()(r, s, beta=1.0)
    assert torch.allclose(dropped, ref, atol=1e-6)
    kept = small(p_drop_path=0.0, p_drop_token=0.0).train()(r, s, beta=1.0)
    assert not torch.allclose(kept, ref)


def test_drop_token_masks_structure_tokens() -> None:
    r, s = inputs()
    no_drop = small(p_drop_path=0.0, p_drop_token=0.0).train()(r, s)
    m = small(p_drop_path=0.0, p_drop_token=1.0, token_drop_rate=1.0).train()
    torch.manual_seed(4)
    all_dropped = m(r, s)
    assert not torch.allclose(all_dropped, no_drop)
    # with every structure token masked (-100 logits), their values no longer matter
    torch.manual_seed(4)
    assert torch.allclose(all_dropped, m(r, s * 5 + 1), atol=1e-5)
    # but DropToken is not DropPath: attn2 still attends to the latents themselves
    assert not torch.allclose(all_dropped, m.eval()(r, s, beta=0.0))


def test_drop_token_rate_and_seed() -> None:
    """Half the tokens are dropped per DropToken sample; torch.manual_seed makes it reproducible."""
    m = small(p_drop_path=0.0, p_drop_token=1.0, token_drop_rate=0.5).train()
    torch.manual_seed(5)
    keep, bias = m._structure_regularisation(6, 16, torch.device("cpu"))
    assert torch.equal(keep, torch.ones(6, 1, 1))
    assert ((bias < 0).sum(1) == 8).all()
    assert len({tuple(row.tolist()) for row in (bias < 0)}) > 1  # different tokens per sample
    torch.manual_seed(5)
    _, bias2 = m._structure_regularisation(6, 16, torch.device("cpu"))
    assert torch.equal(bias, bias2)
    r, s = inputs()
    torch.manual_seed(6)
    a = m(r, s)
    torch.manual_seed(6)
    assert torch.equal(a, m(r, s))


def test_mode_probabilities() -> None:
    """Per-sample modes follow p_drop_path / p_drop_token / keep as disjoint events."""
    m = small(p_drop_path=0.33, p_drop_token=0.33, token_drop_rate=0.5).train()
    torch.manual_seed(7)
    keep, bias = m._structure_regularisation(6000, 16, torch.device("cpu"))
    dropped_path = (keep.flatten() == 0).float().mean().item()
    dropped_tok = (bias < 0).any(1).float().mean().item()
    assert abs(dropped_path - 0.33) < 0.03 and abs(dropped_tok - 0.33) < 0.03
    assert not ((keep.flatten() == 0) & (bias < 0).any(1)).any()
    with pytest.raises(ValueError, match="p_drop_path \\+ p_drop_token"):
        IDEmbedding(**SMALL, p_drop_path=0.7, p_drop_token=0.7)


def test_perceiver_mask_bias_equals_removing_tokens() -> None:
    """A -100 bias on a feature token is (numerically) the same as leaving it out."""
    torch.manual_seed(0)
    attn = PerceiverAttention(16, dim_head=4, heads=4)
    x, lat = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    bias = torch.zeros(2, 6)
    bias[:, 4:] = -100.0
    assert torch.allclose(attn(x, lat, bias), attn(x[:, :4], lat), atol=1e-5)


def test_mix_identities() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
    assert torch.equal(mix_identities(a, [b], [0.0]), a)
    assert torch.allclose(mix_identities(a, [b], [1.0]), b)
    assert torch.allclose(mix_identities(a, [b, c], [0.25, 0.5]), 0.25 * a + 0.25 * b + 0.5 * c)
    with pytest.raises(ValueError, match="2 partners but 1 weights"):
        mix_identities(a, [b, c], [0.5])


def test_gradients_reach_all_parameters() -> None:
    m = small(p_drop_path=0.0, p_drop_token=0.0).train()
    r, s = inputs()
    m(r, s, beta=0.5).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_latent_init_scale() -> None:
    m = small()
    assert abs(m.latents.norm(dim=-1).mean().item() - 1.0) < 0.3  # randn * width**-0.5: ~unit-norm queries


def _reference_attention(attn: PerceiverAttention, x: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """Head-by-head re-statement of the released perceiver attention (softmax(q k^T / sqrt(d)) v)."""
    xn, ln = attn.norm1(x), attn.norm2(lat)
    kv_in = torch.cat([xn, ln], 1)
    q, kv = attn.to_q(ln), attn.to_kv(kv_in)
    inner = attn.heads * attn.dim_head
    k, v = kv[..., :inner], kv[..., inner:]
    outs = []
    for h in range(attn.heads):
        sl = slice(h * attn.dim_head, (h + 1) * attn.dim_head)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / attn.dim_head**0.5, dim=-1)
        outs.append(w @ v[..., sl])
    return attn.to_out(torch.cat(outs, -1))


def test_forward_matches_reference_recurrence() -> None:
    """The whole module equals the documented recurrence written out independently."""
    m = small().eval()
    r, s = inputs()
    beta = 0.4
    q = m.latents.expand(3, -1, -1)
    fr, fs = m.proj_id(r), m.proj_clip(s)
    for a1, a2, ff in m.layers:
        q = _reference_attention(a1, fr, q) + q
        q = beta * _reference_attention(a2, fs, q) + q
        q = ff(q) + q
    ref = m.norm_out(m.proj_out(q))
    assert torch.allclose(m(r, s, beta=beta), ref, atol=1e-5)
