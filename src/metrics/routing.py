"""Routing accuracy: does the router send each face position to the identity whose face is there?

Counted positions are those inside the union of the (valid) face masks after resizing the masks to
the routing map's resolution (area interpolation, threshold 0.5). A position is correct when the
identity routed there (argmax over valid slots of the map) is one whose mask covers it (where masks
overlap, either identity is correct); a position with no routing at all (map all zero) is wrong.
Accuracy is pooled over positions (micro-average), overall and per timestep band.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from src.models.router import resize_masks_binary

BAND_EDGES = (250, 500, 750)
BAND_NAMES = ("t<250", "250<=t<500", "500<=t<750", "t>=750")


def routing_hits(hard_maps: Tensor, masks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (correct, counted) position counts, each (B,).

    hard_maps: (B, N, h, w) one-hot routing (or an average of one-hot maps over layers).
    masks:     (B, N, H, W) face masks in {0, 1}; valid: (B, N) bool.
    """
    if hard_maps.shape[:2] != masks.shape[:2] or valid.shape != hard_maps.shape[:2]:
        raise ValueError(
            f"shape mismatch: hard_maps {tuple(hard_maps.shape)}, masks {tuple(masks.shape)}, "
            f"valid {tuple(valid.shape)}"
        )
    # the routing loss's own targets: scored where the router was trained to route
    covered = resize_masks_binary(masks, tuple(hard_maps.shape[-2:])).bool() & valid[:, :, None, None]  # (B, N, h, w)
    scores = hard_maps.float().masked_fill(~valid[:, :, None, None], -1.0)  # invalid slots never win
    routed = scores.argmax(dim=1, keepdim=True)  # (B, 1, h, w)
    has_route = scores.amax(dim=1) > 0  # (B, h, w)
    hit = covered.gather(1, routed)[:, 0] & has_route  # (B, h, w)
    inside = covered.any(dim=1)  # (B, h, w)
    return (hit & inside).flatten(1).sum(1), inside.flatten(1).sum(1)


def timestep_bands(timesteps: Tensor) -> Tensor:
    """(B,) timesteps -> band index (B,) in 0..3: t<250, 250<=t<500, 500<=t<750, t>=750."""
    edges = torch.tensor(BAND_EDGES, device=timesteps.device, dtype=timesteps.dtype)
    return torch.bucketize(timesteps, edges, right=True)


class RoutingAccuracy(Metric):
    """Share of face positions routed to the right identity, overall and per timestep band.

    update(hard_maps (B, N, h, w), masks (B, N, H, W), valid (B, N) bool, timesteps (B,)).
    compute() -> {"all": acc, "t<250": acc, "250<=t<500": ..., "500<=t<750": ..., "t>=750": ...}
    as 0-d float tensors; a band (or "all") with no counted position is NaN (keys are always present
    so logged series stay aligned). Sum states: DDP-safe.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        n = len(BAND_NAMES)
        self.add_state("correct", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, hard_maps: Tensor, masks: Tensor, valid: Tensor, timesteps: Tensor) -> None:
        hit, inside = routing_hits(hard_maps, masks, valid.bool())  # (B,), (B,)
        band = timestep_bands(timesteps.to(hard_maps.device))  # (B,)
        self.correct.index_add_(0, band, hit.to(self.correct.dtype))
        self.total.index_add_(0, band, inside.to(self.total.dtype))

    def compute(self) -> dict[str, Tensor]:
        def acc(c: Tensor, t: Tensor) -> Tensor:
            return (c / t).float() if t > 0 else torch.tensor(math.nan, device=c.device)

        out = {"all": acc(self.correct.sum(), self.total.sum())}
        for i, name in enumerate(BAND_NAMES):
            out[name] = acc(self.correct[i], self.total[i])
        return out
