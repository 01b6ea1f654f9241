"""Numerical parity with the reference computation, written here from official-checkpoints.md and
uniportrait.md, on weights in the RELEASED layout (fp32, relative error < 1e-4).

The reference functions below read raw tensors only: the released `faceid_adapter` / `faceid_proj`
dicts, the stock UNet's base attention weights and the TFace backbone state dict. Our modules get
the same weights through src.inference.convert.load_released / load_face_backbone.

Already covered in tests/models (not repeated): the processor's single-identity formula with its
own modules, the router's logits formula with its own modules, the Q-Former recurrence built from
its own submodules, stage outputs = last unit of each stage.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from src.inference import convert
from src.models import adapters
from src.models.context import FaceIDContext
from src.models.face_backbone import STAGE_UNITS, IRBackbone, load_face_backbone
from src.models.id_embedding import PerceiverAttention
from tests.inference.helpers import one_thread, tiny_embedding, write_released  # noqa: F401 (fixture)
from tests.models.tiny_unets import tiny_sd15_unet

pytestmark = pytest.mark.usefixtures("one_thread")

CROSS = 32
TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------
# face-ID attention inside a UNet loaded from the released layout
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("released")
    stock = tiny_sd15_unet(cross_attention_dim=CROSS)
    emb = tiny_embedding(id_dim=24, structure_dim=40, output_dim=CROSS, seed=3)
    fp, rp = write_released(d, stock, emb, seed=4)
    unet = tiny_sd15_unet(cross_attention_dim=CROSS).eval()
    convert.prepare_unet(unet, id_dim=CROSS, num_tokens=16, lora_rank=4, multi=True)
    ours_emb = tiny_embedding(id_dim=24, structure_dim=40, output_dim=CROSS, seed=77)
    convert.load_released(fp, rp, unet, ours_emb)
    return {
        "unet": unet,
        "embedding": ours_emb.eval(),
        "base": {k: v.clone() for k, v in stock.state_dict().items()},
        "faceid": torch.load(fp, weights_only=True),
        "router": torch.load(rp, weights_only=True)["faceid_adapter"],
        "names": list(stock.attn_processors),
        # the base model's head count per layer (diffusers' legacy `attention_head_dim` is the number of heads)
        "heads": {n: stock.get_submodule(n[: -len(".processor")]).heads for n in stock.attn_processors},
    }


def _linear_lora(x: torch.Tensor, base: dict, prefix: str, lora: dict, i: int, rel: str) -> torch.Tensor:
    """Reference: base Linear + diffusers LoRALinearLayer (x down^T up^T, scale 1)."""
    y = x @ base[f"{prefix}.weight"].T
    if f"{prefix}.bias" in base:
        y = y + base[f"{prefix}.bias"]
    return y + (x @ lora[f"{i}.{rel}_lora.down.weight"].T) @ lora[f"{i}.{rel}_lora.up.weight"].T


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v; (B, L, C), (B, S, C) -> (B, L, C)."""
    b, length, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)
    return (w @ vh).transpose(1, 2).reshape(b, length, c)


def _reference_router(x: torch.Tensor, tokens: torch.Tensor, r: dict, i: int) -> torch.Tensor:
    """theta(Z) . phi(W_aggr F_id(n)) logits, (B, L, h), (B, N, T, D) -> (B, L, N). No 1/sqrt(d)."""
    theta = (F.gelu(x @ r[f"{i}.to_q_router.0.weight"].T + r[f"{i}.to_q_router.0.bias"])
             @ r[f"{i}.to_q_router.2.weight"].T)
    # (B,N,D)
    aggr = (tokens.transpose(-1, -2) @ r[f"{i}.aggr_router.weight"].T).squeeze(-1) + r[f"{i}.aggr_router.bias"]
    phi = (F.gelu(aggr @ r[f"{i}.to_k_router.0.weight"].T + r[f"{i}.to_k_router.0.bias"])
           @ r[f"{i}.to_k_router.2.weight"].T)
    return torch.einsum("blh,bnh->bln", theta, phi)


def _reference_cross_attention(
    x: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor, scale: float, weights_fn, rel: dict, lora: dict,
    base: dict, attn_path: str, i: int, heads: int,
) -> torch.Tensor:
    """Text attention + scale * sum_n w_n face-ID attention(n), combined before to_out (with LoRA)."""
    q = _linear_lora(x, base, f"{attn_path}.to_q", lora, i, "to_q")
    k = _linear_lora(text, base, f"{attn_path}.to_k", lora, i, "to_k")
    v = _linear_lora(text, base, f"{attn_path}.to_v", lora, i, "to_v")
    h = _attend(q, k, v, heads)
    w = weights_fn(x)  # (B, L, N)
    for n in range(tokens.shape[1]):
        kf = tokens[:, n] @ rel[f"{i}.to_k_faceid.weight"].T
        vf = tokens[:, n] @ rel[f"{i}.to_v_faceid.weight"].T
        h = h + scale * w[..., n : n + 1] * _attend(q, kf, vf, heads)
    return _linear_lora(h, base, f"{attn_path}.to_out.0", lora, i, "to_out")


def _capture_attn2(unet, name: str, ctx: FaceIDContext,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the UNet once; return (hidden states, text, output) of the attention module owning `name`."""
    attn = unet.get_submodule(name[: -len(".processor")])
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["text"] = kwargs["encoder_hidden_states"]
        seen["out"] = out

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    g = torch.Generator().manual_seed(seed)
    b = ctx.tokens.shape[0]
    try:
        with torch.no_grad():
            unet(torch.randn(b, 4, 8, 8, generator=g), torch.tensor([500] * b),
                 encoder_hidden_states=torch.randn(b, 7, CROSS, generator=g), cross_attention_kwargs={"faceid": ctx})
    finally:
        handle.remove()
    return seen["x"], seen["text"], seen["out"]


def _tokens(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(2, n, 16, CROSS, generator=torch.Generator().manual_seed(seed))


def _cross_layers(released: dict) -> list[tuple[int, str]]:
    return [(i, n) for i, n in enumerate(released["names"]) if n.endswith("attn2.processor")]


def test_single_identity_face_id_attention_matches_reference(released: dict) -> None:
    unet = released["unet"]
    adapters.set_active_lora(unet, "single_id")
    tokens = _tokens(1)
    for i, name in _cross_layers(released):
        x, text, out = _capture_attn2(unet, name, FaceIDContext(tokens=tokens, latent_hw=(8, 8), scale=0.7))
        ref = _reference_cross_attention(
            x, text, tokens, 0.7, lambda z: torch.ones(z.shape[0], z.shape[1], 1),
            released["faceid"]["faceid_adapter"], released["faceid"]["faceid_adapter"], released["base"],
            name[: -len(".processor")], i, released["heads"][name],
        )
        assert rel_err(out, ref) < TOL, name


def test_routed_identities_match_reference_hard_argmax(released: dict) -> None:
    unet = released["unet"]
    adapters.set_active_lora(unet, "multi_id")
    tokens = _tokens(3, seed=6)
    rel = released["faceid"]["faceid_adapter"]
    chosen = set()
    for i, name in _cross_layers(released):
        x, text, out = _capture_attn2(unet, name, FaceIDContext(tokens=tokens, latent_hw=(8, 8), scale=0.7))

        def hard(z: torch.Tensor, i: int = i) -> torch.Tensor:
            logits = _reference_router(z, tokens, released["router"], i)
            chosen.update(logits.argmax(-1).unique().tolist())
            return F.one_hot(logits.argmax(-1), tokens.shape[1]).float()

        ref = _reference_cross_attention(x, text, tokens, 0.7, hard, rel, released["router"], released["base"],
                                         name[: -len(".processor")], i, released["heads"][name])
        assert rel_err(out, ref) < TOL, name
    assert len(chosen) > 1  # the router really picks different identities at different positions
    adapters.set_active_lora(unet, "single_id")


def test_explicit_masks_match_reference_normalisation(released: dict) -> None:
    unet = released["unet"]
    adapters.set_active_lora(unet, "multi_id")
    tokens = _tokens(2, seed=7)
    masks = torch.zeros(2, 2, 32, 32)
    masks[:, 0, :, :20] = 1
    masks[:, 1, :, 12:] = 1  # overlap (shared 50/50) and a region covered by one only
    masks[1, :, :4] = 0  # rows with no identity at all in sample 1
    for i, name in _cross_layers(released):
        x, text, out = _capture_attn2(unet, name,
                                      FaceIDContext(tokens=tokens, latent_hw=(8, 8), scale=0.7, masks=masks))

        def weights(z: torch.Tensor) -> torch.Tensor:
            side = int(z.shape[1] ** 0.5)
            m = F.interpolate(masks, size=(side, side), mode="bilinear", align_corners=False)  # (B, N, h, w)
            s = m.sum(1, keepdim=True)
            m = torch.where(s > 0, m / s.clamp_min(1e-12), torch.zeros_like(m))
            return m.flatten(2).transpose(1, 2)  # (B, L, N)

        ref = _reference_cross_attention(x, text, tokens, 0.7, weights, released["faceid"]["faceid_adapter"],
                                         released["router"], released["base"], name[: -len(".processor")], i,
                                         released["heads"][name])
        assert rel_err(out, ref) < TOL, name
    adapters.set_active_lora(unet, "single_id")


# ----------------------------------------------------------------------------------------------
# Q-Former from the released faceid_proj dict
# ----------------------------------------------------------------------------------------------
def _ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _reference_perceiver(sd: dict, p: str, feats: torch.Tensor, latents: torch.Tensor, heads: int,
                         dropped: torch.Tensor | None = None) -> torch.Tensor:
    """Queries from norm2(latents); k/v from cat(norm1(feats), norm2(latents)); dim_head**-0.25 on q
    and k; -100 added to dropped feature tokens' scores; to_out."""
    x, lat = _ln(feats, sd, f"{p}.norm1"), _ln(latents, sd, f"{p}.norm2")
    b, nq, _ = lat.shape
    q = lat @ sd[f"{p}.to_q.weight"].T
    k, v = (torch.cat([x, lat], dim=1) @ sd[f"{p}.to_kv.weight"].T).chunk(2, dim=-1)
    dh = q.shape[-1] // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, dh).transpose(1, 2) for t in (q, k, v))
    scores = (q * dh**-0.25) @ (k * dh**-0.25).transpose(-1, -2)  # (B, H, Q, T+Q)
    if dropped is not None:
        mask = torch.cat([dropped.float() * -100.0, torch.zeros(b, nq)], dim=1)  # (B, T+Q)
        scores = scores + mask[:, None, None, :]
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, nq, heads * dh)
    return out @ sd[f"{p}.to_out.weight"].T


def _reference_qformer(sd: dict, fr: torch.Tensor, fs: torch.Tensor, beta: float, heads: int) -> torch.Tensor:
    def mlp(x: torch.Tensor, p: str) -> torch.Tensor:
        h = F.gelu(x @ sd[f"{p}.0.weight"].T + sd[f"{p}.0.bias"])
        return h @ sd[f"{p}.2.weight"].T + sd[f"{p}.2.bias"]

    fr, fs = mlp(fr, "proj_id"), mlp(fs, "proj_clip")
    q = sd["latents"].expand(fr.shape[0], -1, -1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(depth):
        q = _reference_perceiver(sd, f"layers.{i}.0", fr, q, heads) + q
        q = beta * _reference_perceiver(sd, f"layers.{i}.1", fs, q, heads) + q
        h = F.gelu(_ln(q, sd, f"layers.{i}.2.0") @ sd[f"layers.{i}.2.1.weight"].T)
        q = h @ sd[f"layers.{i}.2.3.weight"].T + q
    return _ln(q @ sd["proj_out.weight"].T + sd["proj_out.bias"], sd, "norm_out")


def test_qformer_matches_reference_layer_sequence(released: dict) -> None:
    sd = released["faceid"]["faceid_proj"]
    emb = released["embedding"]
    g = torch.Generator().manual_seed(8)
    fr, fs = torch.randn(2, 2 * 49, 24, generator=g), torch.randn(2, 2 * 9, 40, generator=g)  # 2 references each
    for beta in (0.0, 0.3, 1.0):
        with torch.no_grad():
            ours = emb(fr, fs, beta=beta)
        assert rel_err(ours, _reference_qformer(sd, fr, fs, beta, heads=emb.layers[0][0].heads)) < TOL


def test_perceiver_token_mask_matches_reference_minus_100(released: dict) -> None:
    sd = released["faceid"]["faceid_proj"]
    attn: PerceiverAttention = released["embedding"].layers[1][1]
    g = torch.Generator().manual_seed(9)
    feats, lat = torch.randn(2, 12, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    dropped = torch.rand(2, 12, generator=g) < 0.5
    with torch.no_grad():
        ours = attn(feats, lat, dropped.float() * -100.0)
    ref = _reference_perceiver(sd, "layers.1.1", feats, lat, attn.heads, dropped)
    assert rel_err(ours, ref) < TOL


# ----------------------------------------------------------------------------------------------
# IR backbone from a TFace-layout state dict
# ----------------------------------------------------------------------------------------------
def _bn(x: torch.Tensor, sd: dict, p: str, affine: bool = True) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"],
                        sd[f"{p}.weight"] if affine else None, sd[f"{p}.bias"] if affine else None, False, 0.0, 1e-5)


def _reference_ir(sd: dict, x: torch.Tensor, units: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TFace IR: input_layer; body units out = res_layer(x) + shortcut(x), stride 2 on each stage's
    first unit (MaxPool2d(1, 2) = subsampling when widths match, else 1x1 conv + BN); output_layer."""
    h = F.prelu(_bn(F.conv2d(x, sd["input_layer.0.weight"], padding=1), sd, "input_layer.1"),
                sd["input_layer.2.weight"])
    stages, idx = [], 0
    for n in units:
        for j in range(n):
            p, stride = f"body.{idx}", 2 if j == 0 else 1
            if f"{p}.shortcut_layer.0.weight" in sd:
                sc = _bn(F.conv2d(h, sd[f"{p}.shortcut_layer.0.weight"], stride=stride), sd, f"{p}.shortcut_layer.1")
            else:
                sc = h[:, :, ::stride, ::stride]
            r = _bn(h, sd, f"{p}.res_layer.0")
            r = F.conv2d(r, sd[f"{p}.res_layer.1.weight"], padding=1)
            r = F.prelu(_bn(r, sd, f"{p}.res_layer.2"), sd[f"{p}.res_layer.3.weight"])
            r = _bn(F.conv2d(r, sd[f"{p}.res_layer.4.weight"], stride=stride, padding=1), sd, f"{p}.res_layer.5")
            h = r + sc
            idx += 1
        stages.append(h)
    e = _bn(h, sd, "output_layer.0").flatten(1) @ sd["output_layer.3.weight"].T + sd["output_layer.3.bias"]
    return _bn(e, sd, "output_layer.4", affine=False), stages


def test_ir_backbone_matches_reference_block_structure(tmp_path: Path) -> None:
    torch.manual_seed(10)
    widths = (8, 8, 16, 32)  # equal first widths: stage 2's first unit has the MaxPool shortcut with stride 2
    sd = IRBackbone(18, widths, 16).state_dict()
    for k, v in sd.items():  # non-trivial BN statistics and PReLU slopes
        if k.endswith("running_var"):
            sd[k] = v.uniform_(0.5, 1.5)
        elif k.endswith(("running_mean", "bias")) or ".2.weight" in k and v.ndim == 1:
            sd[k] = v.normal_(0, 0.1)
    path = tmp_path / "ir18.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_face_backbone(path, num_layers=18, widths=widths, embedding_size=16)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        feats = model(x)
    emb, stages = _reference_ir(sd, x, STAGE_UNITS[18])
    assert rel_err(feats.embedding, emb) < TOL
    for ours, ref in zip(feats.stages, stages):
        assert ours.shape == ref.shape and rel_err(ours, ref) < TOL
