"""End-of-run reports printed for the user: did the loss fall, does the identity pathway carry identity."""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from src.metrics.identity import nearest_neighbour_identification

log = logging.getLogger(__name__)


class LossTrend(L.Callback):
    """Records the training loss every step; at the end prints the mean of the first and the last
    `fraction` of steps (the issue's check: the last 20% clearly below the first 20%)."""

    def __init__(self, key: str = "train/diffusion", fraction: float = 0.2) -> None:
        self.key, self.fraction = key, fraction
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        v = trainer.callback_metrics.get(self.key)
        if v is not None:
            self.values.append(float(v))

    def summary(self) -> dict[str, float] | None:
        n = int(len(self.values) * self.fraction)
        if n < 1:
            return None
        first = sum(self.values[:n]) / n
        last = sum(self.values[-n:]) / n
        return {"first": first, "last": last, "ratio": last / first}

    def on_train_end(self, trainer, pl_module) -> None:
        s = self.summary()
        if s is None or not trainer.is_global_zero:
            return
        pct = int(self.fraction * 100)
        print(
            f"[loss trend] {self.key}: first {pct}% of steps {s['first']:.4f} -> last {pct}% {s['last']:.4f} "
            f"(x{s['ratio']:.3f})",
            flush=True,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"values": self.values}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values = list(state_dict.get("values", []))


class IdentityProbe(L.Callback):
    """Before and after training, on the validation (held-out) batches: the denoising loss with each
    image's own identity vs. another image's identity, same timesteps and noise (module.identity_gap),
    and how well the identity tokens alone tell the held-out people apart (nearest-neighbour
    identification, `src.metrics.identity`; the stage-2 router can separate faces no better)."""

    def __init__(self, max_batches: int = 8, seed: int = 1234) -> None:
        self.max_batches, self.seed = max_batches, seed
        self.before: tuple[float, float, float | None] | None = None

    def measure(self, trainer, pl_module) -> tuple[float, float, float | None] | None:
        """(loss with own identity, loss with another identity, token nearest-neighbour accuracy)."""
        dm = trainer.datamodule
        if dm is None or getattr(dm, "val_shards", None) is None:
            return None
        was_training = pl_module.training
        pl_module.eval()
        own = other = 0.0
        n = 0
        tokens: list[torch.Tensor] = []
        labels: list[str] = []
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        for i, batch in enumerate(dm.val_dataloader()):
            if i >= self.max_batches:
                break
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            a, b = pl_module.identity_gap(batch, generator=g)
            own, other, n = own + float(a), other + float(b), n + 1
            with torch.no_grad():
                t = pl_module.batch_identity_tokens(batch)  # (B, N, Q, D)
            tokens.append(t[batch["face_valid"]].float().cpu())  # (M, Q, D), faces in (sample, slot) order
            labels += [name for names in batch["identity"] for name in names]
        pl_module.train(was_training)
        if not n:
            return None
        nn_acc = nearest_neighbour_identification(torch.cat(tokens), labels) if tokens else None
        return own / n, other / n, nn_acc

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.before is None:
            self.before = self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        after = self.measure(trainer, pl_module)
        if after is None or not trainer.is_global_zero:
            return
        for name, r in (("before training", self.before), ("after training", after)):
            if r is not None:
                tok = "n/a (no identity occurs twice)" if r[2] is None else f"{r[2]:.3f}"
                print(f"[identity probe] {name}: held-out loss with own identity {r[0]:.5f}, "
                      f"with another identity {r[1]:.5f} (gap {r[1] - r[0]:+.5f}); identity tokens' "
                      f"nearest-neighbour identification of held-out faces {tok}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"before": list(self.before) if self.before else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        b = state_dict.get("before")
        self.before = (*b, None)[:3] if b else None  # checkpoints before the token probe hold two values
