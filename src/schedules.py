"""Learning-rate schedules a config can name (`model.lr_scheduler: {class_path: src.schedules.WarmupCosine}`).

The module steps every scheduler once per optimizer step (Lightning `interval: "step"`), so `*_steps`
here count optimizer steps of the stage the optimizer was built for (a stage switch rebuilds both).
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosine"]


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0 over `warmup_steps`, then a half cosine from each group's lr down to
    `min_ratio` x that lr at `total_steps`, constant afterwards. Applies to every parameter group
    alike, so the groups' lr ratios (LoRA x0.1 in stage 2) hold at every step.

    Args:
        optimizer: the optimizer (passed by the module).
        total_steps: optimizer steps until the end of the decay (e.g. `trainer.max_steps`).
        warmup_steps: steps of linear warm-up (0 = none).
        min_ratio: final lr as a fraction of the peak.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"WarmupCosine: need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                             f"total_steps={total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupCosine: min_ratio must be in [0, 1], got {min_ratio}")
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """lr multiplier at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        frac = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
