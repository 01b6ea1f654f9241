"""The identity inputs of one UNet forward, passed explicitly to every attention processor.

diffusers forwards `cross_attention_kwargs` from `unet(...)` to each processor's `__call__`; the
module puts one `FaceIDContext` there under the key ``faceid``. Nothing lives at module level and no
processor finds identities by slicing the text context.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingRecord:
    """Collector the routed processors write into during one forward (for the loss and the maps)."""

    names: list[str] = field(default_factory=list)  # processor name per entry
    probs: list[torch.Tensor] = field(default_factory=list)  # soft psi, (B, N, h, w) each
    hard: list[torch.Tensor] = field(default_factory=list)  # one-hot routing used, (B, N, h, w) each

    def clear(self) -> None:
        self.names.clear()
        self.probs.clear()
        self.hard.clear()


@dataclass
class FaceIDContext:
    """Identity conditioning for one forward of the UNet.

    tokens:     (B, N, T, D) identity tokens (T = 16 per identity; D = cross-attention dim).
    valid:      (B, N) bool; padded identity slots are False and never routed to. None = all valid.
    scale:      faceid_scale; 0 reproduces the base UNet exactly.
    latent_hw:  (H, W) of the UNet input latents, to turn a layer's token sequence into a map.
    masks:      optional explicit routing masks (B, N, H', W') that replace the router; resized to
                each layer and normalised over identities where any is set.
    gumbel_tau: Gumbel-softmax temperature (training: straight-through hard samples);
                None = deterministic hard argmax (inference).
    record:     optional collector for routing probabilities and hard maps.
    """

    tokens: torch.Tensor
    latent_hw: tuple[int, int]
    valid: torch.Tensor | None = None
    scale: float = 1.0
    masks: torch.Tensor | None = None
    gumbel_tau: float | None = None
    record: RoutingRecord | None = None

    @property
    def num_ids(self) -> int:
        return self.tokens.shape[1]

    def valid_mask(self) -> torch.Tensor:
        if self.valid is not None:
            return self.valid
        b, n = self.tokens.shape[:2]
        return torch.ones(b, n, dtype=torch.bool, device=self.tokens.device)
