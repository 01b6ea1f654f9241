"""UniPortrait's ID embedding module: proj_id, proj_clip and the 6-layer Q-Former.

Parameter names follow the released ``faceid_proj`` state dict exactly (see
docs official-checkpoints.md): ``latents``, ``proj_id.{0,2}``, ``proj_clip.{0,2}``,
``layers.{i}.0`` / ``layers.{i}.1`` (perceiver attentions: ``norm1``, ``norm2``, ``to_q``,
``to_kv``, ``to_out``), ``layers.{i}.2`` (FFN: ``.0`` LayerNorm, ``.1`` / ``.3`` Linear without
bias), ``proj_out``, ``norm_out``.

Per layer:  q = attn1(proj_id(F_r), q) + q
            q = beta * attn2(proj_clip(F_s), q) + q      (DropToken on its input, DropPath on its output)
            q = FFN(q) + q
Output:     norm_out(proj_out(q))  -> (B, num_queries, output_dim)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

# Logit bias of a dropped feature token (the released code adds -100: effectively zero weight).
DROPPED_TOKEN_BIAS = -100.0


class PerceiverAttention(nn.Module):
    """Latents attend to cat(features, latents) (IP-Adapter / UniPortrait resampler attention).

    Both inputs are LayerNorm-ed (``norm1`` features, ``norm2`` latents); queries come from the
    latents, keys/values from the concatenation. The 1/sqrt(dim_head) score scale is applied as
    dim_head**-0.25 on q and on k (numerically safer in fp16, same result).
    """

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, heads*dim_head) -> (B, heads, L, dim_head)."""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, dim) features; latents: (B, Q, dim); bias: optional (B, T) additive logit bias
        for the feature tokens (0 keep, -100 dropped). Returns (B, Q, dim)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self._heads(self.to_q(latents))  # (B, H, Q, d)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)  # (B, H, T+Q, d)
        scale = self.dim_head**-0.25
        logits = (q * scale) @ (k * scale).transpose(-2, -1)  # (B, H, Q, T+Q)
        if bias is not None:
            full = torch.cat([bias, bias.new_zeros(b, q_len)], dim=1)  # (B, T+Q): latents never masked
            logits = logits + full[:, None, None, :].to(logits.dtype)
        weight = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, q_len, -1)  # (B, Q, H*d)
        return self.to_out(out)


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """FFN in the released layout: LayerNorm, Linear(no bias), GELU, Linear(no bias)."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


def two_layer_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, 2*in), GELU, Linear(2*in, out) (``proj_id`` and ``proj_clip``)."""
    return nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.GELU(), nn.Linear(2 * in_dim, out_dim))


@dataclass
class QFormerSpec:
    """Architecture and training-time regularisers of the ID embedding module (paper: 6 x 16 x 768)."""

    depth: int = 6
    num_queries: int = 16
    width: int = 768
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4
    p_drop_path: float = 0.33
    p_drop_token: float = 0.33
    token_drop_rate: float = 0.5


class IDEmbedding(nn.Module):
    """Turns one identity's face features into ``num_queries`` tokens in the UNet's text space.

    Args:
        id_dim: channels of the intrinsic tokens F_r (512 = IR-101 last stage).
        structure_dim: channels of the structure tokens F_s (1728 = 448 face + 1280 CLIP ViT-H).
        width: Q-Former width (768).
        output_dim: token dim given to the UNet (its cross-attention dim, 768 for SD1.5).
        depth, num_queries, heads, dim_head, ff_mult: Q-Former shape (6, 16, 12, 64, 4).
        p_drop_path: training only, per-sample probability that the whole attn2 branch is zeroed.
        p_drop_token: training only, per-sample probability of DropToken on attn2's input. The two
            are disjoint events (paper: drop 0.33 / DropToken 0.33 / keep 0.34), so their sum must
            be <= 1.
        token_drop_rate: share of the structure tokens masked in a DropToken sample.
    """

    def __init__(
        self,
        id_dim: int = 512,
        structure_dim: int = 1728,
        width: int = 768,
        output_dim: int = 768,
        depth: int = 6,
        num_queries: int = 16,
        heads: int = 12,
        dim_head: int = 64,
        ff_mult: int = 4,
        p_drop_path: float = 0.33,
        p_drop_token: float = 0.33,
        token_drop_rate: float = 0.5,
    ) -> None:
        super().__init__()
        probs = {"p_drop_path": p_drop_path, "p_drop_token": p_drop_token, "token_drop_rate": token_drop_rate}
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if p_drop_path + p_drop_token > 1.0 + 1e-9:
            raise ValueError(
                "p_drop_path + p_drop_token must be <= 1 (disjoint per-sample events), "
                f"got {p_drop_path} + {p_drop_token}"
            )
        self.id_dim = id_dim
        self.structure_dim = structure_dim
        self.output_dim = output_dim
        self.num_queries = num_queries
        self.p_drop_path = p_drop_path
        self.p_drop_token = p_drop_token
        self.token_drop_rate = token_drop_rate
        # Learned queries: randn * width**-0.5 gives each query vector unit expected norm, the same
        # scale as a LayerNorm-ed token, so the first residual updates are neither swamped by nor
        # swamp the queries (IP-Adapter / UniPortrait resampler init).
        self.latents = nn.Parameter(torch.randn(1, num_queries, width) * width**-0.5)
        self.proj_id = two_layer_mlp(id_dim, width)
        self.proj_clip = two_layer_mlp(structure_dim, width)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(width, dim_head=dim_head, heads=heads),
                    PerceiverAttention(width, dim_head=dim_head, heads=heads),
                    feed_forward(width, ff_mult),
                ]
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(width, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def _structure_regularisation(
        self, batch: int, num_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-sample DropPath / DropToken decisions (training only), from the global torch RNG.

        Returns (keep, bias): keep (B, 1, 1) multiplies attn2's output (0 = DropPath), bias (B, T)
        is added to attn2's logits of the feature tokens (-100 = dropped token); None when unused.
        """
        if not self.training or (self.p_drop_path == 0 and self.p_drop_token == 0):
            return None, None
        u = torch.rand(batch, device=device)  # one draw per sample decides its mode
        drop_path = u < self.p_drop_path  # (B,)
        drop_token = (~drop_path) & (u < self.p_drop_path + self.p_drop_token)  # (B,)
        keep = (~drop_path).float().view(batch, 1, 1)  # no 1/(1-p) rescale: beta sets the scale at inference
        n_drop = int(round(self.token_drop_rate * num_tokens))
        bias = None
        if n_drop > 0 and bool(drop_token.any()):
            # rank random scores per sample; the n_drop lowest-ranked tokens are dropped
            ranks = torch.rand(batch, num_tokens, device=device).argsort(dim=1).argsort(dim=1)  # (B, T)
            dropped = (ranks < n_drop) & drop_token[:, None]  # (B, T)
            bias = dropped.float() * DROPPED_TOKEN_BIAS
        return keep, bias

    def forward(
        self, intrinsic: torch.Tensor, structure: torch.Tensor, beta: float | torch.Tensor = 1.0
    ) -> torch.Tensor:
        """Identity tokens for one identity per batch element.

        Args:
            intrinsic: (B, R*49, id_dim) F_r of R references concatenated on the token axis.
            structure: (B, R*Ts, structure_dim) F_s of the same references (Ts = CLIP patches).
            beta: face-structure scale, a float or a (B,) tensor.

        Returns:
            (B, num_queries, output_dim) F_id.
        """
        if intrinsic.ndim != 3 or intrinsic.shape[-1] != self.id_dim:
            raise ValueError(f"intrinsic must be (B, T, {self.id_dim}), got {tuple(intrinsic.shape)}")
        if structure.ndim != 3 or structure.shape[-1] != self.structure_dim:
            raise ValueError(f"structure must be (B, T, {self.structure_dim}), got {tuple(structure.shape)}")
        if structure.shape[0] != intrinsic.shape[0]:
            raise ValueError(f"batch sizes differ: intrinsic {intrinsic.shape[0]} vs structure {structure.shape[0]}")
        b = intrinsic.shape[0]
        beta_t = torch.as_tensor(beta, dtype=intrinsic.dtype, device=intrinsic.device)
        if beta_t.ndim > 1 or (beta_t.ndim == 1 and beta_t.shape[0] != b):
            raise ValueError(f"beta must be a float or a ({b},) tensor, got shape {tuple(beta_t.shape)}")
        beta_t = beta_t.reshape(-1, 1, 1)  # (1 or B, 1, 1)

        keep, bias = self._structure_regularisation(b, structure.shape[1], intrinsic.device)
        if keep is not None:
            beta_t = beta_t * keep.to(beta_t.dtype)  # DropPath: attn2 branch zeroed for dropped samples

        q = self.latents.expand(b, -1, -1)  # (B, Q, width)
        f_r = self.proj_id(intrinsic)  # (B, R*49, width)
        f_s = self.proj_clip(structure)  # (B, R*Ts, width)
        for attn1, attn2, ff in cast("Iterable[nn.ModuleList]", self.layers):  # (attn1, attn2, ffn) per layer
            q = attn1(f_r, q) + q
            q = beta_t * attn2(f_s, q, bias) + q
            q = ff(q) + q
        return self.norm_out(self.proj_out(q))  # (B, Q, output_dim)


def mix_identities(base: torch.Tensor, partners: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Identity interpolation: (1 - sum w) * base + sum_i w_i * partner_i.

    base and each partner: (B, Q, D) ID tokens; one weight per partner. Returns (B, Q, D).
    """
    if len(partners) != len(weights):
        raise ValueError(f"got {len(partners)} partners but {len(weights)} weights")
    out = (1.0 - float(sum(weights))) * base
    for i, (p, w) in enumerate(zip(partners, weights)):
        if p.shape != base.shape:
            raise ValueError(f"partner {i} has shape {tuple(p.shape)}, base has {tuple(base.shape)}")
        out = out + float(w) * p
    return out
