"""UniPortraitModule: the two-stage UniPortrait training recipe as a LightningModule.

Stage 1 (single ID): train the ID embedding (MLPs + Q-Former), the face-ID projections of every
cross-attention layer and the `single_id` LoRA with the epsilon-prediction loss.
Stage 2 (multi ID): freeze the ID embedding; train the routers and the `multi_id` LoRA (initialised
from `single_id`, learning rate x `stage2_lora_lr_scale`) with diffusion + routing loss.

The networks come from `components` (local files); nothing here is SD1.5-specific: every dimension
is read from the UNet's and encoders' configs.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from src.conventions import checked_cached_latents, vae_latents
from src.models import adapters
from src.models.adapters import MULTI, SINGLE
from src.models.conditioning import TextConditioning, batch_added_conditions, encode_prompt
from src.models.context import FaceIDContext, RoutingRecord
from src.models.id_embedding import IDEmbedding, QFormerSpec
from src.models.identity_encoder import FeatureCache, IdentityEncoder
from src.models.presets import ComponentPaths
from src.models.router import routing_loss, schedule_tau
from src.precision import adapters_to, cast_frozen, frozen_autocast, parse_frozen_dtype
from src.probes import ProbesMixin

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the run stops (Lightning's on_exception hooks save state)."""


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, weight_decay=1e-2)


class UniPortraitModule(ProbesMixin, L.LightningModule):
    """Args:
    components: where the frozen base networks come from (local files).
    stage: 1 (single ID) or 2 (multi ID); the stage-switch callback moves 1 -> 2 mid-run.
    lora_rank: LoRA rank of both adapters (128 at SD1.5 scale).
    qformer: ID embedding architecture and DropToken / DropPath rates.
    lr: base learning rate of every parameter group.
    lora_lr_scale: LoRA group multiplier in stage 1.
    id_embedding_lr_scale: ID-embedding group multiplier in stage 1 (the paper trains it at `lr`). A
        smaller value keeps different people's identity tokens apart on a weak identity signal: on the
        embedded default (commit 5367c0b, 2026-12-05), 0.1 instead of 1.0 lifted `make demo`'s stage-2
        routing accuracy at t<250 from 0.879 / 0.764 / 0.916 / 0.751 to 0.911 / 0.798 / 0.936 / 0.789
        (seen 2 / seen 3 / unseen 2 / unseen 3 faces).
    stage2_lora_lr_scale: LoRA group multiplier in stage 2 (paper: 0.1).
    optimizer: optimizer factory, called with the named parameter groups.
    lr_scheduler: optional scheduler factory, called with the optimizer and stepped once per optimizer
        step (e.g. `src.schedules.WarmupCosine`); rebuilt with the optimizer at a stage switch.
    p_drop_face: share of samples that drop the face condition (CFG's unconditional branch).
    routing_lambda: weight of the routing regularisation loss (paper: 0.1).
    gumbel_tau: Gumbel-softmax temperature of the router during training (its start value when
        `gumbel_tau_end` is set).
    gumbel_tau_end: optional final temperature: tau is annealed from `gumbel_tau` to it over the first
        `gumbel_tau_steps` optimizer steps of stage 2 (`gumbel_tau_mode` "exp" or "linear"), constant after.
    faceid_scale: face-ID attention scale during training.
    init_from: a checkpoint of this module whose adapter weights start this run (e.g. stage 2 from a
        stage-1 run: the multi-ID LoRA is then initialised from its single-ID LoRA).
    max_nonfinite_steps: a step whose loss is not finite is skipped and counted; this many in a row
        stop the run (after a checkpoint, see NonFiniteLossError).
    gradient_checkpointing: recompute the UNet's activations in the backward pass (diffusers'
        checkpointing; RNG state preserved, so Gumbel samples match): less memory, larger batches.
    channels_last: keep the UNet in channels-last memory format (faster convolutions on GPUs).
    compile_unet: `torch.compile` the UNet with its adapters in place (parameter names and
        checkpoints unchanged; the face-ID processor traces without graph breaks). The stage switch
        adds routers and a LoRA, which recompiles once.
    compile_backend / compile_mode: passed to `torch.compile` ("inductor" needs a C++ compiler on
        the CPU; "aot_eager" does not).
    frozen_dtype: "bfloat16" or "float16" stores the frozen base networks (UNet, VAE (a `force_upcast` one stays
        fp32 in float16), text encoder, face backbone, CLIP tower) in that dtype, the adapters in fp32, runs the
        module's forwards under autocast (src/precision.py); "float32" (default) keeps everything fp32.
    feature_cache: memoise the frozen face-backbone and CLIP features of up to this many faces, keyed
        by the batch's `face_digest` (0: off). A sample seen again skips both encoders (a third of the
        tiny stage-2 step, `make bench`). Memory per face is logged at the start; at SD1.5 scale (ViT-H
        patch tokens) it is 1.8 MB in fp32. See `src.models.identity_encoder.FeatureCache`.
    """

    def __init__(
        self,
        components: ComponentPaths,
        stage: int = 1,
        lora_rank: int = 128,
        qformer: QFormerSpec = QFormerSpec(),  # noqa: B008 (never mutated; LightningCLI reads this default)
        lr: float = 1e-5,
        lora_lr_scale: float = 1.0,
        id_embedding_lr_scale: float = 1.0,
        stage2_lora_lr_scale: float = 0.1,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        p_drop_face: float = 0.05,
        routing_lambda: float = 0.1,
        gumbel_tau: float = 1.0,
        gumbel_tau_end: float | None = None,
        gumbel_tau_steps: int = 0,
        gumbel_tau_mode: str = "exp",
        faceid_scale: float = 1.0,
        init_from: str | None = None,
        max_nonfinite_steps: int = 10,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile_unet: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
        feature_cache: int = 0,
        frozen_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if gumbel_tau_end is not None:
            schedule_tau(0, gumbel_tau, gumbel_tau_end, gumbel_tau_steps, gumbel_tau_mode)  # validates the values
        inf = float("inf")  # allowed ranges: lr multipliers, faces to cache (0 = off), a probability
        ranges = {"lora_lr_scale": (lora_lr_scale, inf), "id_embedding_lr_scale": (id_embedding_lr_scale, inf),
                  "stage2_lora_lr_scale": (stage2_lora_lr_scale, inf), "feature_cache": (feature_cache, inf),
                  "p_drop_face": (p_drop_face, 1.0)}
        for name, (value, high) in ranges.items():
            if not 0 <= value <= high:
                raise ValueError(f"model.{name} must be in [0, {high}], got {value}")
        self.save_hyperparameters(ignore=["components", "optimizer", "lr_scheduler", "qformer"])
        self.hparams["qformer"] = asdict(qformer)  # plain types: checkpoints load with weights_only=True
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.strict_loading = False  # checkpoints hold adapters only; see on_load_checkpoint

        self.frozen_dtype = parse_frozen_dtype(frozen_dtype)
        nets = components.build()
        cast_frozen((nets.unet, nets.vae, *nets.text_encoders, nets.face, nets.clip), self.frozen_dtype)
        self.unet, self.vae, self.text_encoder = nets.unet, nets.vae, nets.text_encoder
        self.tokenizer, self.scheduler = nets.tokenizer, nets.scheduler
        self.text_encoder_2, self.tokenizer_2 = nets.text_encoder_2, nets.tokenizer_2  # SDXL's; None on SD1.5
        cross_dim = self.unet.config.cross_attention_dim
        embedding = IDEmbedding(
            id_dim=nets.face.intrinsic_dim,
            structure_dim=nets.face.structure_dim + nets.clip.width,
            width=qformer.width,
            output_dim=cross_dim,
            depth=qformer.depth,
            num_queries=qformer.num_queries,
            heads=qformer.heads,
            dim_head=qformer.dim_head,
            ff_mult=qformer.ff_mult,
            p_drop_path=qformer.p_drop_path,
            p_drop_token=qformer.p_drop_token,
            token_drop_rate=qformer.token_drop_rate,
        )
        self.identity = IdentityEncoder(nets.face, nets.clip, embedding,
                                        cache=FeatureCache(feature_cache) if feature_cache else None)
        # to_k_faceid copies to_k, to_v_faceid starts at zero: the untrained model is the base model
        # exactly, and the gap between own and other identity starts at 0.
        adapters.install_faceid_processors(self.unet, id_dim=cross_dim, num_tokens=qformer.num_queries,
                                           value_init="zero")
        adapters.add_lora(self.unet, SINGLE, rank=lora_rank)
        adapters_to(self.unet, torch.float32)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile_unet:
            self.unet.compile(backend=compile_backend, mode=compile_mode)  # in place: same state_dict keys
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        # validation means, reduced over all ranks at the epoch end (a rank with no batch still takes part)
        self.val_means = torch.nn.ModuleDict({"own": MeanMetric(), "other": MeanMetric()})
        self.stage = 0
        self.stage_start_step = 0  # global step at which the current stage began (Gumbel schedule)
        self.configure_stage(1)
        if init_from:
            self.load_adapter_checkpoint(init_from)
        self.configure_stage(stage)

    # ------------------------------------------------------------------ stages
    def configure_stage(self, stage: int) -> None:
        """Set trainable parameters, the active LoRA and routers for `stage` (idempotent)."""
        if stage == 2 and not adapters.router_parameters(self.unet):
            dtype = next(iter(adapters.faceid_parameters(self.unet).values())).dtype  # the adapters' dtype now
            adapters.add_routers(self.unet)
            adapters.add_lora(self.unet, MULTI, rank=self.hparams.lora_rank, init_from=SINGLE)
            adapters_to(self.unet, dtype)
            self.unet.to(self.device)
        if stage == 1:
            adapters.set_active_lora(self.unet, SINGLE)
            adapters.set_trainable(self.unet, faceid=True, router=False, lora=SINGLE)
            self.identity.embedding.requires_grad_(True)
        else:
            adapters.set_active_lora(self.unet, MULTI)
            adapters.set_trainable(self.unet, faceid=False, router=True, lora=MULTI)
            self.identity.embedding.requires_grad_(False)
        if stage != self.stage and self._trainer is not None:
            self.stage_start_step = self.global_step
        self.stage = stage
        self.train(self.training)  # re-apply eval mode to whatever is frozen now

    def train(self, mode: bool = True) -> UniPortraitModule:
        super().train(mode)
        for frozen in filter(None, (self.vae, self.text_encoder, self.text_encoder_2)):
            frozen.eval()
        if self.stage == 2:
            self.identity.embedding.eval()  # frozen in stage 2: no DropToken / DropPath
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Named optimizer parameter groups of the current stage (trainable parameters only)."""
        lr = self.hparams.lr
        if self.stage == 1:
            groups = {
                "id_embedding": (
                    dict(self.identity.embedding.named_parameters()),
                    lr * self.hparams.id_embedding_lr_scale,
                ),
                "faceid_attention": (adapters.faceid_parameters(self.unet), lr),
                "lora_single_id": (adapters.lora_parameters(self.unet, SINGLE), lr * self.hparams.lora_lr_scale),
            }
        else:
            groups = {
                "router": (adapters.router_parameters(self.unet), lr),
                "lora_multi_id": (
                    adapters.lora_parameters(self.unet, MULTI),
                    lr * self.hparams.stage2_lora_lr_scale,
                ),
            }
        return [
            {"name": name, "params": list(params.values()), "lr": group_lr}
            for name, (params, group_lr) in groups.items()
            if params
        ]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self.param_groups()
        n_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_grouped = sum(p.numel() for g in groups for p in g["params"])
        if n_trainable != n_grouped:
            raise RuntimeError(f"optimizer groups hold {n_grouped} parameters but {n_trainable} are trainable")
        summary = ", ".join(f"{g['name']}={sum(p.numel() for p in g['params']):,} (lr {g['lr']:.2e})" for g in groups)
        log.info("stage %d trainable parameters: %s; total %s", self.stage, summary, f"{n_trainable:,}")
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def current_gumbel_tau(self) -> float:
        """The router's Gumbel temperature at this step of the current stage (see `gumbel_tau_end`)."""
        hp = self.hparams
        if hp.gumbel_tau_end is None:
            return float(hp.gumbel_tau)
        step = self.global_step - self.stage_start_step if self._trainer is not None else 0
        return schedule_tau(step, hp.gumbel_tau, hp.gumbel_tau_end, hp.gumbel_tau_steps, hp.gumbel_tau_mode)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f) (posterior mode: deterministic)."""
        with self.autocast():
            return vae_latents(self.vae, image)

    @torch.no_grad()
    def encode_prompt(self, captions: list[str]) -> TextConditioning:
        """Text states (B, 77, D) and, on SDXL, the pooled embedding (B, P) (src/models/conditioning.py)."""
        with self.autocast():
            return encode_prompt(captions, (self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2))

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.encode_prompt(captions).hidden  # (B, 77, D)

    def identity_tokens(
        self, recog: torch.Tensor, clip_crop: torch.Tensor, valid: torch.Tensor, drop: torch.Tensor | None = None,
        digest: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-slot identity tokens. recog (B, N, 3, 112, 112), clip_crop (B, N, 3, S, S), valid (B, N)
        -> (B, N, Q, D); padded slots stay zero (and are never routed to). digest: optional (B, N) crop
        fingerprints (the batch's `face_digest`), the keys of `model.feature_cache`."""
        b, n = valid.shape
        flat = valid.flatten()  # (B*N,)
        face_drop = None if drop is None else drop[:, None].expand(b, n).flatten()[flat]
        keys = None if digest is None else digest.flatten()[flat]  # (M,)
        with self.autocast():
            tokens = self.identity(
                recog.flatten(0, 1)[flat][:, None], clip_crop.flatten(0, 1)[flat][:, None], drop=face_drop, keys=keys
            )  # (M, Q, D)
        out = tokens.new_zeros(b * n, *tokens.shape[1:])
        out[flat] = tokens
        return out.view(b, n, *tokens.shape[1:])

    def batch_identity_tokens(self, batch: dict[str, Any], drop: torch.Tensor | None = None) -> torch.Tensor:
        """`identity_tokens` of a loader batch (its crops, validity and `face_digest` cache keys)."""
        return self.identity_tokens(batch["face_recog"], batch["face_clip"], batch["face_valid"], drop,
                                    batch.get("face_digest"))

    def _context(self, tokens: torch.Tensor, valid: torch.Tensor, latents: torch.Tensor, record: RoutingRecord | None):
        return FaceIDContext(
            tokens=tokens,
            latent_hw=tuple(latents.shape[-2:]),
            valid=valid,
            scale=self.hparams.faceid_scale,
            gumbel_tau=self.current_gumbel_tau() if (self.training and self.stage == 2) else None,
            record=record,
        )

    def _denoise(self, noisy, t, text, ctx, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        with self.autocast():  # added: SDXL's added_cond_kwargs (None on SD1.5)
            return self.unet(noisy, t, encoder_hidden_states=text, added_cond_kwargs=added,
                             cross_attention_kwargs={"faceid": ctx}).sample

    def autocast(self):
        """Autocast to `model.frozen_dtype` around a forward when the frozen weights are not fp32 (else a no-op)."""
        return frozen_autocast(self.device, self.frozen_dtype)

    # ------------------------------------------------------------------ training
    def _sample_noise(self, latents: torch.Tensor, generator: torch.Generator | None = None):
        """Noise, timesteps and noisy latents, in fp32 whatever the latents' dtype: diffusers' `add_noise` works
        in the latents' dtype, and in bf16 the first timesteps' noise levels round away (t = 0, 1: none at all)."""
        latents = latents.to(torch.promote_types(latents.dtype, torch.float32))
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        t = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
            device=latents.device,
        )
        return noise, t, self.scheduler.add_noise(latents, noise, t)

    def batch_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled latents (B, C, h, w): the batch's cached ones (`data.cached_latents`) when present, checked
        against this VAE's scaling factor and latent shape, else encoded from the images now."""
        if "latents" not in batch:
            return self.encode_images(batch["image"])
        return checked_cached_latents(self.vae, batch).to(self.device, self.vae.dtype)

    def shared_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latents = self.batch_latents(batch)  # (B, 4, h, w)
        prompt = self.encode_prompt(batch["caption"])
        text, added = prompt.hidden, batch_added_conditions(prompt, batch)  # added: None on SD1.5
        valid = batch["face_valid"]
        drop = None
        if self.training and self.stage == 1 and self.hparams.p_drop_face > 0:
            drop = torch.rand(valid.shape[0], device=self.device) < self.hparams.p_drop_face
        tokens = self.batch_identity_tokens(batch, drop)
        noise, t, noisy = self._sample_noise(latents)
        record = RoutingRecord() if self.stage == 2 else None
        pred = self._denoise(noisy, t, text, self._context(tokens, valid, latents, record), added)
        out = {"diffusion": F.mse_loss(pred.float(), noise.float())}
        if record is not None:
            out["routing"] = (
                routing_loss(record.probs, batch["face_masks"], valid, lam=self.hparams.routing_lambda)
                if record.probs
                else pred.new_zeros(())
            )
        out["loss"] = sum(v for k, v in out.items())
        return out

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")  # every rank skips together
        return bool(finite > 0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        out = self.shared_step(batch)
        bs = batch["image"].shape[0]
        if not self._all_ranks_finite(out["loss"]):
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            log.warning("non-finite loss at step %d (%s): step skipped (%d in a row, %d in total)",
                        self.global_step, {k: float(v) for k, v in out.items()}, self.nonfinite_in_a_row,
                        self.nonfinite_total)
            self.log("train/nonfinite_skipped", float(self.nonfinite_total), batch_size=bs)
            if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.global_step} "
                    f"(limit model.max_nonfinite_steps={self.hparams.max_nonfinite_steps}); lower the learning "
                    "rate or check the data"
                )
            return None  # Lightning skips the optimizer step
        self.nonfinite_in_a_row = 0
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, prog_bar=True, batch_size=bs)
        self.log("train/stage", float(self.stage), batch_size=bs)
        if self.stage == 2:
            self.log("train/gumbel_tau", self.current_gumbel_tau(), batch_size=bs)
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].sum().float(), reduce_fx="sum", batch_size=bs)
        if self.identity.cache is not None:
            self.log("data/feature_cache_hit_rate", self.identity.cache.hit_rate(), batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        own, other = self.identity_gap(batch, generator=g)  # (M,) each
        self.val_means["own"].update(own)
        self.val_means["other"].update(other)

    def on_validation_epoch_end(self) -> None:
        means = {f"val/loss_{k}_id": m.compute() for k, m in self.val_means.items()}  # every rank's samples
        for m in self.val_means.values():
            m.reset()
        if all(torch.isfinite(v) for v in means.values()):  # NaN: no validation sample had an identity
            self.log_dict(means, sync_dist=True)  # already equal on every rank

    # ------------------------------------------------------------------ public probes (callbacks use these)
    # identity_gap, identity_path_silent, probe_inputs, routing_maps: src/probes.py (ProbesMixin)

    # ------------------------------------------------------------------ checkpoints: adapters only
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"identity.embedding.{k}": v for k, v in self.identity.embedding.state_dict().items()}
        sd.update({f"unet.{k}": v for k, v in adapters.adapter_state_dict(self.unet).items()})
        return sd

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v.detach().clone() for k, v in self.adapter_state_dict().items()}
        checkpoint["uniportrait"] = {"stage": self.stage, "stage_start_step": self.stage_start_step, "format": 1,
                                     "arch": "sd15" if self.text_encoder_2 is None else "sdxl"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any], source: str = "checkpoint") -> None:
        """Rebuild the checkpoint's stage (routers, multi-ID LoRA) before Lightning loads the weights."""
        meta = checkpoint.get("uniportrait")
        if meta is None:
            raise ValueError(f"{source}: not a UniPortrait checkpoint (no 'uniportrait' section)")
        self.configure_stage(int(meta["stage"]))
        self.stage_start_step = int(meta.get("stage_start_step", 0))
        expected = set(self.adapter_state_dict())
        got = set(checkpoint.get("state_dict", {}))
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not match the model: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )

    def load_adapter_checkpoint(self, path: str | Path) -> None:
        """Load the adapter weights of a checkpoint written by this module (weights_only pickle)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model.init_from: checkpoint not found: '{path}'")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        self.on_load_checkpoint(checkpoint, source=str(path))
        self.stage_start_step = 0  # weights only: this run's stage starts at its own step 0
        self.load_state_dict(checkpoint["state_dict"], strict=False)
        log.info("loaded adapter weights of stage %d from %s", self.stage, path)

    # ---- sampling (for callbacks) ----
    @torch.no_grad()
    def sample_images(
        self,
        batch: dict[str, Any],
        num_inference_steps: int = 10,
        guidance_scale: float = 3.0,
        faceid_scale: float = 1.0,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Generate one image per batch sample from its caption and its identities (aligned crops).

        batch: "caption" (B strings), "face_recog" (B, N, 3, 112, 112), "face_clip" (B, N, 3, S, S) in
        [-1, 1], "face_valid" (B, N), "image" (B, 3, H, W) (only its size is used), and for several
        identities in stage 1 "face_masks" (B, N, H, W) (no routers yet: explicit masks replace them).
        Sampling is `src.inference.pipeline.UniPortraitPipeline` (DDIM, classifier-free guidance) built on this
        module's own networks (shared, not copied); sample b uses seed `seed + b`.
        Returns {"images": (B, 3, H, W) in [-1, 1]}. The module's mode and active LoRA are restored.
        """
        import numpy as np

        from src.inference.pipeline import Identity, UniPortraitPipeline
        from src.models.presets import Components

        was_training = self.training
        self.eval()
        nets = Components(self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler,
                          self.identity.clip, self.identity.face, self.text_encoder_2, self.tokenizer_2)
        pipe = UniPortraitPipeline.from_components(nets, self.identity.embedding)
        height, width = batch["image"].shape[-2:]
        routed = bool(adapters.router_parameters(self.unet))
        images = []
        try:
            for b, caption in enumerate(batch["caption"]):
                slots = batch["face_valid"][b].nonzero().flatten().tolist()
                identities = [Identity.from_crops(batch["face_recog"][b, n][None], batch["face_clip"][b, n][None])
                              for n in slots]
                masks = None
                if len(slots) > 1 and not routed:
                    masks = batch["face_masks"][b, slots].float().cpu()  # (N, H, W)
                with self.autocast():
                    out = pipe(caption, identities, faceid_scale=faceid_scale, guidance_scale=guidance_scale,
                               num_inference_steps=num_inference_steps, seed=seed + b, height=int(height),
                               width=int(width), masks=masks, progress=False)
                arr = torch.from_numpy(np.asarray(out.images[0].convert("RGB")).copy())  # (H, W, 3) uint8
                images.append(arr.permute(2, 0, 1).float() / 127.5 - 1.0)  # (3, H, W)
        finally:
            adapters.set_active_lora(self.unet, MULTI if self.stage == 2 else SINGLE)
            self.train(was_training)
        return {"images": torch.stack(images).to(self.device)}  # (B, 3, H, W)
