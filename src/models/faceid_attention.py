"""Attention processors: text cross-attention + decoupled face-ID attention with per-position routing.

    h = Attn(q, text) + faceid_scale * sum_n w_n * Attn(q, F_id(n))          (combined before to_out)

The query q is the layer's own (`attn.to_q`, which carries the LoRA when peft wraps it). The
identity inputs arrive only through `unet(..., cross_attention_kwargs={"faceid": FaceIDContext})`;
diffusers' `Attention.forward` passes a kwarg to a processor only when the processor's `__call__`
names it, which is why `faceid` is an explicit parameter of both processors here.

Routing weights w (B, L, N): the valid mask when N == 1 (or when no sample has two valid
identities and no router is installed), explicit masks when `ctx.masks` is given, else the router.
"""
from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from src.models.context import FaceIDContext
from src.models.router import IDRouter, route

__all__ = ["FaceIDAttnProcessor", "SelfAttnProcessor", "layer_hw", "base_linear"]


def layer_hw(latent_hw: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """(h, w) of a UNet layer whose token sequence has length `seq_len`.

    The UNet halves the latent map with stride-2 convs (padding 1), i.e. ceil(H / 2) per level, so
    the layer's map is the first ceil-halving of `latent_hw` whose area equals `seq_len`.
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"layer_hw: latent_hw must be positive, got {tuple(latent_hw)}")
    while h * w > seq_len and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != seq_len:
        raise ValueError(
            f"layer_hw: sequence length {seq_len} is not a ceil-halving of latent_hw={tuple(latent_hw)} "
            f"(FaceIDContext.latent_hw must be the UNet input's (H, W))"
        )
    return h, w


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain Linear under a peft LoRA wrapper (or the module itself when not wrapped)."""
    get_base = getattr(module, "get_base_layer", None)
    return cast(nn.Linear, get_base() if callable(get_base) else module)


class FaceIDAttnProcessor(nn.Module):
    """Cross-attention processor with decoupled face-ID attention and optional ID router.

    Args:
        hidden_size: output width of to_k_faceid / to_v_faceid (= the layer's attention inner dim).
        id_dim: D, width of the identity tokens.
        num_tokens: T, tokens per identity (16).
        with_router: create the router now (stage 2); `add_router()` does it later.
        query_dim: width of the hidden states the router sees (the input of to_q); defaults to
            `hidden_size` (equal in SD1.5 / SDXL UNets).
    """

    def __init__(
        self,
        hidden_size: int,
        id_dim: int,
        num_tokens: int = 16,
        with_router: bool = False,
        query_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.id_dim = id_dim
        self.num_tokens = num_tokens
        self.query_dim = hidden_size if query_dim is None else query_dim
        self.name = ""  # the attn_processors key, set by adapters.install_faceid_processors
        self.to_k_faceid = nn.Linear(id_dim, hidden_size, bias=False)
        self.to_v_faceid = nn.Linear(id_dim, hidden_size, bias=False)
        self.router: IDRouter | None = None
        if with_router:
            self.add_router()

    def add_router(self) -> IDRouter:
        """Create the router (same device/dtype as the face-ID projections) if missing; return it."""
        if self.router is None:
            ref = self.to_k_faceid.weight
            self.router = IDRouter(self.query_dim, self.id_dim, self.num_tokens).to(device=ref.device, dtype=ref.dtype)
        return self.router

    @torch.no_grad()
    def init_from_attention(self, attn: Attention) -> bool:
        """Copy-initialise to_k_faceid / to_v_faceid from the layer's text to_k / to_v.

        IP-Adapter practice: the face-ID attention then starts as a text-like attention whose
        keys/values live in the same space the pretrained query was trained against, so early
        training refines a sensible attention instead of injecting random features. Only done when
        the shapes match (id_dim == the layer's cross-attention dim); the text bias (if any) is not
        copied since the face-ID projections have none. Returns True when both were copied.
        """
        copied = 0
        for src, dst in ((attn.to_k, self.to_k_faceid), (attn.to_v, self.to_v_faceid)):
            src_w = base_linear(src).weight
            if src_w.shape == dst.weight.shape:
                dst.weight.copy_(src_w.to(dst.weight.dtype))
                copied += 1
        return copied == 2

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        faceid: FaceIDContext | None = None,
    ) -> torch.Tensor:
        # Explicit signature (diffusers inspects it to decide which kwargs to pass); goes through
        # nn.Module.__call__ so module hooks still run.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, faceid)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        faceid: FaceIDContext | None = None,
    ) -> torch.Tensor:
        """diffusers AttnProcessor2_0 (0.42.1), line for line, plus the face-ID branch before to_out.

        hidden_states: (B, L, C) or (B, C, H, W); encoder_hidden_states: (B, S, D_text).
        Returns the same shape as `hidden_states`.
        """
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects attention_mask shape to be
            # (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        router_input = hidden_states  # (B, L, C): the tensor to_q sees, input of the router
        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )  # (B, heads, L, head_dim)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if faceid is not None and faceid.scale != 0:
            face = self.faceid_attention(attn, query, router_input, faceid)  # (B, L, inner)
            hidden_states = hidden_states + faceid.scale * face

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states

    def faceid_attention(
        self, attn: Attention, query: torch.Tensor, router_input: torch.Tensor, ctx: FaceIDContext
    ) -> torch.Tensor:
        """sum_n w_n * Attn(q, F_id(n)): one attention per identity, fused into two matmuls.

        query: (B, heads, L, head_dim) after norm_q (norm_k is not applied to the face keys, as in
        diffusers' IP-Adapter processors); router_input: (B, L, C). Returns (B, L, heads*head_dim).

        The scores against all N*T face keys come from one matmul; the softmax runs over each
        identity's T keys; the routing weights scale each identity's attention probabilities, so a
        second matmul with the N*T values gives the weighted sum directly:
            sum_n w_n sum_t softmax_t(q.k_nt / sqrt(d)) v_nt .
        Equal to N separate scaled-dot-product attentions (`tests/models/test_faceid_attention.py`), with
        two matmuls in all instead of N attentions or a batch N times larger.
        """
        bsz, heads, seq_len, head_dim = query.shape
        tokens = ctx.tokens.to(device=query.device, dtype=query.dtype)  # (B, N, T, D)
        if tokens.ndim != 4 or tokens.shape[0] != bsz or tokens.shape[-1] != self.id_dim:
            raise ValueError(
                f"{self.name or 'FaceIDAttnProcessor'}: FaceIDContext.tokens must be (B={bsz}, N, T, {self.id_dim}), "
                f"got {tuple(tokens.shape)}"
            )
        num_ids, num_tok = tokens.shape[1], tokens.shape[2]
        key = self.to_k_faceid(tokens)  # (B, N, T, inner)
        value = self.to_v_faceid(tokens)  # (B, N, T, inner)
        if key.shape[-1] != heads * head_dim:
            raise ValueError(
                f"{self.name or 'FaceIDAttnProcessor'}: to_k_faceid outputs {key.shape[-1]} channels, "
                f"the layer's query has {heads}x{head_dim}"
            )
        key = key.reshape(bsz, num_ids * num_tok, heads, head_dim).permute(0, 2, 3, 1)  # (B, heads, hd, N*T)
        value = value.reshape(bsz, num_ids * num_tok, heads, head_dim).transpose(1, 2)  # (B, heads, N*T, hd)
        scores = torch.matmul(query * head_dim**-0.5, key)  # (B, heads, L, N*T)
        probs = scores.view(bsz, heads, seq_len, num_ids, num_tok).softmax(dim=-1)  # (B, heads, L, N, T)
        weights = self.routing_weights(router_input, tokens, ctx).to(probs.dtype)  # (B, L, N)
        probs = probs * weights[:, None, :, :, None]  # (B, heads, L, N, T)
        out = torch.matmul(probs.view(bsz, heads, seq_len, num_ids * num_tok), value)  # (B, heads, L, hd)
        return out.transpose(1, 2).reshape(bsz, seq_len, heads * head_dim)  # (B, L, inner)

    def routing_weights(self, hidden: torch.Tensor, tokens: torch.Tensor, ctx: FaceIDContext) -> torch.Tensor:
        """Per-position identity weights (B, L, N); invalid identities always get 0.

        Priority: explicit `ctx.masks` (resized bilinearly to the layer, normalised over identities
        where any is set, 0 elsewhere) > N == 1 (the valid mask) > router (`route` with
        ctx.gumbel_tau; probs and weights are appended to ctx.record).
        """
        bsz, seq_len = hidden.shape[:2]
        num_ids = tokens.shape[1]
        valid = ctx.valid_mask().to(device=hidden.device, dtype=torch.bool)  # (B, N)
        if valid.shape != (bsz, num_ids):
            raise ValueError(f"{self.name}: FaceIDContext.valid must be ({bsz}, {num_ids}), got {tuple(valid.shape)}")
        validf = valid.to(hidden.dtype)  # (B, N)
        if ctx.masks is not None:
            return self._mask_weights(ctx, valid, seq_len).to(hidden.dtype)
        if num_ids == 1:
            return validf[:, None, :].expand(bsz, seq_len, num_ids)  # (B, L, 1)
        if self.router is None:
            if bool((valid.sum(dim=1) > 1).any()):
                raise ValueError(
                    f"{self.name or 'FaceIDAttnProcessor'}: {num_ids} valid identities in a sample but no router is "
                    "installed; call adapters.add_routers(unet) or pass FaceIDContext.masks"
                )
            return validf[:, None, :].expand(bsz, seq_len, num_ids)  # (B, L, N), <= 1 valid id per sample
        logits = self.router.logits(hidden, tokens)  # (B, L, N)
        probs, weights = route(logits, valid, ctx.gumbel_tau)  # (B, L, N) each
        if ctx.record is not None:
            h, w = layer_hw(ctx.latent_hw, seq_len)
            ctx.record.names.append(self.name)
            ctx.record.probs.append(probs.transpose(1, 2).reshape(bsz, num_ids, h, w))  # (B, N, h, w)
            ctx.record.hard.append(weights.detach().transpose(1, 2).reshape(bsz, num_ids, h, w))  # (B, N, h, w)
        return weights

    def _mask_weights(self, ctx: FaceIDContext, valid: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Explicit masks (B, N, H', W') -> (B, L, N) weights normalised over identities."""
        masks = ctx.masks
        assert masks is not None  # the caller (`_weights`) checked it
        if masks.ndim != 4 or masks.shape[:2] != valid.shape:
            raise ValueError(
                f"{self.name or 'FaceIDAttnProcessor'}: FaceIDContext.masks must be (B, N, H, W) with (B, N) = "
                f"{tuple(valid.shape)}, got {tuple(masks.shape)}"
            )
        h, w = layer_hw(ctx.latent_hw, seq_len)
        m = F.interpolate(masks.to(device=valid.device, dtype=torch.float32), size=(h, w), mode="bilinear",
                          align_corners=False)  # (B, N, h, w)
        m = m * valid[:, :, None, None]
        total = m.sum(dim=1, keepdim=True)  # (B, 1, h, w)
        m = torch.where(total > 0, m / total.clamp_min(1e-12), torch.zeros_like(m))
        return m.flatten(2).transpose(1, 2)  # (B, L, N)


class SelfAttnProcessor(AttnProcessor2_0):
    """Stock AttnProcessor2_0 that accepts (and ignores) `faceid`, so diffusers does not warn."""

    name: str = ""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        faceid: FaceIDContext | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
