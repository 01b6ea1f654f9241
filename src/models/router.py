"""ID routing: which single identity is injected at each position of a cross-attention layer.

For N identities with tokens F_id(n) (T x D each) and a layer's hidden states Z (L x h):

    psi(Z, F_id, l) = Softmax_n( theta(Z)_l . phi(W_aggr F_id(n)) )      (plain dot product)
    k*(l)           = argmax_n psi

`IDRouter` computes the logits, `route` turns them into the soft probabilities psi (for the
routing loss) and the hard one-hot weights the processor uses (argmax at inference, straight-through
Gumbel-softmax in training), and `routing_loss` is the paper's regulariser

    L_route = lambda * (1/N) * || W_route (.) (psi - M) ||_2^2 .

Submodule names match the released router checkpoint (`to_q_router.0/.2`, `to_k_router.0/.2`,
`aggr_router`) so its keys map 1:1 after stripping the `router.` prefix.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IDRouter", "route", "routing_loss", "resize_masks_binary", "schedule_tau"]


class IDRouter(nn.Module):
    """Router of one cross-attention layer (theta on hidden states, phi on aggregated ID tokens).

    Args:
        hidden_dim: h, channel width of the layer's hidden states (the tensor `to_q` sees).
        id_dim: D, width of the identity tokens (768 for SD1.5).
        num_tokens: T, tokens per identity; W_aggr is Linear(T -> 1) over the token axis.

    Initialisation: PyTorch's default Linear init (the paper trains the router from scratch in
    stage 2; the released checkpoint is loaded over it when available).
    """

    def __init__(self, hidden_dim: int, id_dim: int, num_tokens: int = 16) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.id_dim = id_dim
        self.num_tokens = num_tokens
        # theta: Linear(h, 2h), GELU, Linear(2h, h, no bias)
        self.to_q_router = nn.Sequential(
            nn.Linear(hidden_dim, 2 * hidden_dim), nn.GELU(), nn.Linear(2 * hidden_dim, hidden_dim, bias=False)
        )
        # phi: Linear(D, 2D), GELU, Linear(2D, h, no bias)
        self.to_k_router = nn.Sequential(
            nn.Linear(id_dim, 2 * id_dim), nn.GELU(), nn.Linear(2 * id_dim, hidden_dim, bias=False)
        )
        # W_aggr: Linear(T, 1) over the token axis of one identity
        self.aggr_router = nn.Linear(num_tokens, 1)

    def logits(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Routing logits.

        Args:
            hidden: (B, L, h) hidden states of the layer.
            tokens: (B, N, T, D) identity tokens.
        Returns:
            (B, L, N) logits theta(Z) . phi(W_aggr F_id(n)), no 1/sqrt(d) (as the released code).
        """
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_dim:
            raise ValueError(f"IDRouter.logits: hidden must be (B, L, {self.hidden_dim}), got {tuple(hidden.shape)}")
        if tokens.ndim != 4 or tokens.shape[2] != self.num_tokens or tokens.shape[3] != self.id_dim:
            raise ValueError(
                f"IDRouter.logits: tokens must be (B, N, {self.num_tokens}, {self.id_dim}), got {tuple(tokens.shape)}"
            )
        q = self.to_q_router(hidden)  # (B, L, h)
        aggr = self.aggr_router(tokens.transpose(-1, -2)).squeeze(-1)  # (B, N, D)
        k = self.to_k_router(aggr)  # (B, N, h)
        return torch.einsum("blh,bnh->bln", q, k)  # (B, L, N)


def _masked_softmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to `valid`; exactly 0 on invalid entries.

    x: (B, L, N); valid: (B, 1, N) bool. Rows without any valid entry return all zeros (no NaN).
    """
    x = x.masked_fill(~valid, torch.finfo(x.dtype).min)
    return torch.softmax(x, dim=-1) * valid  # (B, L, N)


def route(
    logits: torch.Tensor, valid: torch.Tensor, gumbel_tau: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft probabilities and hard routing weights from router logits.

    Args:
        logits: (B, L, N) router logits.
        valid: (B, N) bool; invalid (padded) identities are excluded (-inf) and get weight 0.
        gumbel_tau: None -> deterministic hard argmax (inference); a float -> straight-through
            Gumbel-softmax: the forward value is the one-hot of argmax(logits + g), the gradient is
            that of softmax((logits + g) / tau).
    Returns:
        probs: (B, L, N) psi = softmax(logits) over valid identities (used by the routing loss).
        weights: (B, L, N) one-hot over valid identities (all zero for a sample without valid ones).
        With one valid identity both are 1 there.
    """
    if logits.ndim != 3 or valid.shape != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"route: logits (B, L, N) and valid (B, N) expected, got {tuple(logits.shape)} and "
                         f"{tuple(valid.shape)}")
    valid3 = valid.to(torch.bool)[:, None, :]  # (B, 1, N)
    probs = _masked_softmax(logits, valid3)  # (B, L, N)
    if gumbel_tau is None:
        scores = logits
    else:
        if gumbel_tau <= 0:
            raise ValueError(f"route: gumbel_tau must be > 0, got {gumbel_tau}")
        gumbels = -torch.empty_like(logits).exponential_().log()  # (B, L, N) Gumbel(0, 1) noise
        scores = logits + gumbels
    index = scores.masked_fill(~valid3, float("-inf")).argmax(dim=-1)  # (B, L)
    hard = F.one_hot(index, logits.shape[-1]).to(logits.dtype) * valid3  # (B, L, N)
    if gumbel_tau is None:
        return probs, hard
    soft = _masked_softmax(scores / gumbel_tau, valid3)  # (B, L, N)
    # straight-through: `soft - soft.detach()` is exactly 0 in the forward pass, so the value is
    # exactly one-hot while the gradient is the Gumbel-softmax one.
    return probs, hard + (soft - soft.detach())


def resize_masks_binary(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Face masks at image resolution -> binary masks at a layer's resolution.

    Area interpolation (the fraction of each layer cell covered by the face), then threshold at 0.5,
    so the target stays binary as in the paper (a face covering less than half of every cell of a
    coarse layer vanishes at that layer).

    masks: (B, N, H, W) in {0, 1}; returns (B, N, h, w) float in {0, 1}.
    """
    m = masks.float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="area")
    return (m >= 0.5).to(m.dtype)


def routing_loss(
    probs: Sequence[torch.Tensor], masks: torch.Tensor, valid: torch.Tensor, lam: float = 0.1
) -> torch.Tensor:
    """Routing regularisation L_route averaged over samples, then over layers.

    Per sample b and layer: lam / N_b * sum_{n, u, v} ( W_route * (psi - M) )^2, where M are the
    face masks resized to the layer (`resize_masks_binary`: area + threshold 0.5), W_route is the
    union (max) of the valid identities' masks, and N_b the number of valid identities. The squared
    norm SUMS over positions and identities (a mean over the map would make lam=0.1 negligible).
    Samples with fewer than 2 valid identities contribute 0 (no routing choice to supervise); the
    per-sample values are averaged over all B samples (zeros included), then over layers.

    Args:
        probs: one (B, N, h, w) tensor of soft psi per routed layer.
        masks: (B, N, H, W) binary face masks at image (or latent) resolution.
        valid: (B, N) bool.
        lam: lambda (paper: 0.1).
    Returns:
        scalar loss (0 when `probs` is empty).
    """
    if len(probs) == 0:
        return masks.new_zeros(())
    if masks.ndim != 4 or valid.shape != masks.shape[:2]:
        raise ValueError(f"routing_loss: masks (B, N, H, W) and valid (B, N) expected, got {tuple(masks.shape)} and "
                         f"{tuple(valid.shape)}")
    validf = valid.to(probs[0].dtype)[:, :, None, None]  # (B, N, 1, 1)
    num_valid = valid.to(torch.long).sum(dim=1)  # (B,)
    multi = (num_valid >= 2).to(probs[0].dtype)  # (B,)
    per_layer = []
    for i, psi in enumerate(probs):
        if psi.ndim != 4 or psi.shape[:2] != masks.shape[:2]:
            raise ValueError(f"routing_loss: probs[{i}] must be (B, N, h, w) = {tuple(masks.shape[:2])} + (h, w), "
                             f"got {tuple(psi.shape)}")
        m = resize_masks_binary(masks, (psi.shape[-2], psi.shape[-1])).to(psi.dtype) * validf  # (B, N, h, w)
        w_route = m.amax(dim=1, keepdim=True)  # (B, 1, h, w) union of the faces
        sq = ((w_route * (psi * validf - m)) ** 2).sum(dim=(1, 2, 3))  # (B,)
        per_sample = lam * sq / num_valid.clamp(min=1).to(psi.dtype) * multi  # (B,)
        per_layer.append(per_sample.mean())
    return torch.stack(per_layer).mean()


def schedule_tau(step: int, start: float, end: float, steps: int, mode: str = "exp") -> float:
    """Gumbel temperature annealed from `start` to `end` over `steps` steps, constant afterwards.

    mode "exp": start * (end / start) ** (step / steps) (geometric); "linear": straight line.
    """
    if start <= 0 or end <= 0:
        raise ValueError(f"schedule_tau: start and end must be > 0, got start={start}, end={end}")
    if steps <= 0:
        return float(end)
    frac = min(max(step / steps, 0.0), 1.0)
    if mode == "exp":
        return float(start * math.exp(frac * math.log(end / start)))
    if mode == "linear":
        return float(start + frac * (end - start))
    raise ValueError(f"schedule_tau: mode must be 'exp' or 'linear', got {mode!r}")
