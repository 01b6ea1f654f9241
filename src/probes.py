"""The public probes of `src.module.UniPortraitModule` (a mixin of it): what callbacks and notebooks read about
the model's identity pathway and routing, without training it.

- `identity_gap`: per-image denoising loss with the image's own identity tokens and with another person's.
- `identity_path_silent`: whether the face-ID branch can change the UNet's output at all.
- `probe_inputs`: latents, text states, identity tokens, face validity and (SDXL) the UNet's added conditions
  of a batch, computed once.
- `routing_maps`: the routers' soft and hard assignments of one denoising forward.

They use the module's networks and its conditioning and denoising steps (`encode_images`, `encode_prompt`,
`batch_identity_tokens`, `_sample_noise`, `_context`, `_denoise`, `unet`, `scheduler`, `hparams.faceid_scale`);
on SDXL every forward gets the batch's `added_cond_kwargs` (pooled text, time_ids: src/models/conditioning.py).
"""
from __future__ import annotations

from typing import Any

import torch

from src.metrics.identity import other_identity_partners
from src.models import adapters
from src.models.conditioning import batch_added_conditions
from src.models.context import RoutingRecord


class ProbesMixin:
    """`identity_gap`, `identity_path_silent`, `probe_inputs` and `routing_maps` of UniPortraitModule."""

    @torch.no_grad()
    def identity_gap(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                     draws: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image denoising loss with the image's own identity tokens and with those of another image
        of the batch that shares none of its identity labels (`other_identity_partners`), same noise and
        timesteps, averaged over `draws` noise draws (the frozen encoders run once). Returns (own, other),
        each (M,) over the M images that have such a partner (an image of unknown identity, or a batch of
        one person, has none). The identity pathway carries identity when own < other."""
        partners = other_identity_partners(batch["identity"])
        kept = [b for b, p in enumerate(partners) if p is not None]
        latents, text, tokens, valid, added = self.probe_inputs(batch)
        other = tokens[[b if p is None else p for b, p in enumerate(partners)]]  # (B, N, Q, D)
        # A silent face-ID branch (every to_v_faceid zero, as before stage 1 trains) adds exactly 0 whatever the
        # tokens, so the other identity's forward would repeat the own one bit for bit: it is not run.
        silent = self.identity_path_silent()

        def loss(tok: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
            pred = self._denoise(noisy, t, text, self._context(tok, valid, latents, None), added)
            return (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))[kept]  # (M,)

        own_draws, other_draws = [], []
        for _ in range(draws):
            drawn = self._sample_noise(latents, generator)  # (noise, t, noisy)
            own_draws.append(loss(tokens, *drawn))
            other_draws.append(own_draws[-1] if silent else loss(other, *drawn))
        return torch.stack(own_draws).mean(0), torch.stack(other_draws).mean(0)

    def identity_path_silent(self) -> bool:
        """True when the face-ID branch cannot change the UNet's output: no face-ID processor, a face-ID scale
        of 0, or every to_v_faceid weight exactly zero (`value_init="zero"` before training), where the
        branch's values, and so its output, are 0 for any identity tokens."""
        values = [p for n, p in adapters.faceid_parameters(self.unet).items() if n.endswith("to_v_faceid.weight")]
        return not values or self.hparams.faceid_scale == 0 or not any(bool(p.detach().any()) for p in values)

    @torch.no_grad()
    def probe_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           dict[str, torch.Tensor] | None]:
        """What every probe forward of `batch` starts from, computed once in inference mode: scaled latents
        (B, C, h, w), text states (B, 77, D), identity tokens (B, N, Q, D), face validity (B, N) and the UNet's
        added_cond_kwargs (SDXL: pooled text (B, P) and time_ids (B, 6) from the batch's crop; None on SD1.5)."""
        was_training = self.training
        self.eval()
        prompt = self.encode_prompt(batch["caption"])
        out = (self.encode_images(batch["image"]), prompt.hidden, self.batch_identity_tokens(batch),
               batch["face_valid"], batch_added_conditions(prompt, batch))
        self.train(was_training)
        return out

    @torch.no_grad()
    def routing_maps(self, batch: dict[str, Any], timesteps: torch.Tensor | int, seed: int = 0,
                     inputs: tuple[torch.Tensor, ...] | None = None) -> dict[str, Any]:
        """Inference-mode routing of one denoising forward at `timesteps` (int or (B,)).

        `inputs`: the batch's `probe_inputs` when several forwards share them (else computed here).
        Returns {"names": [layer names], "hard": [(B, N, h, w) one-hot], "probs": [(B, N, h, w)],
        "masks": (B, N, H, W) target face masks, "valid": (B, N)}. Callbacks use only this.
        """
        latents, text, tokens, valid, added = inputs if inputs is not None else self.probe_inputs(batch)
        was_training = self.training
        self.eval()
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
        t = torch.as_tensor(timesteps, device=self.device).long().expand(latents.shape[0])
        record = RoutingRecord()
        self._denoise(self.scheduler.add_noise(latents, noise, t), t, text,
                      self._context(tokens, valid, latents, record), added)
        self.train(was_training)
        return {"names": list(record.names), "hard": list(record.hard), "probs": list(record.probs),
                "masks": batch["face_masks"], "valid": valid}
