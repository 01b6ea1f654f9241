"""UniPortrait inference on diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (or their ControlNet
variants; the architecture is the components', see src/inference/arch.py).

The diffusers pipeline runs the denoising loop; UniPortrait enters only through
``cross_attention_kwargs={"faceid": FaceIDContext}``, which the pipeline forwards to the UNet at
every step (ControlNet's own attention is never given it: it sees text only). With classifier-free
guidance the pipeline batches ``[uncond; cond]``, so the context's identity tokens are
``[uncond identity tokens; cond identity tokens]`` in that order, each repeated per image.

Identity tokens are computed once per call (not per step):
    identity n -> crops of its R references (M=1, R, ...) -> IdentityEncoder -> (1, Q, D)
    interpolation partners -> mix_identities((1 - sum w) F_id + sum w_i F_id(i))
One identity: single-ID LoRA, no router. Several: multi-ID LoRA + routers (hard argmax), or
explicit masks (normalised over identities) instead of the routers.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from peft.tuners.lora import LoraLayer
from PIL import Image

from src.conventions import CLIP_CROP_SIZE, uint8_to_unit
from src.faces import FaceDetector, crops_for, largest_face, load_rgb
from src.inference import arch, convert
from src.models import adapters
from src.models.context import FaceIDContext, RoutingRecord
from src.models.id_embedding import IDEmbedding, mix_identities
from src.models.identity_encoder import IdentityEncoder
from src.models.presets import ComponentPaths, Components

log = logging.getLogger(__name__)

__all__ = ["Identity", "RoutingMap", "PipelineOutput", "UniPortraitPipeline", "SCHEDULERS", "make_scheduler"]

SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
    "ddpm": DDPMScheduler,
}
# The released demo's DDIM settings on SD1.5's noise schedule.
_SCHEDULER_OVERRIDES = {"steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}

ImageLike = np.ndarray | str | Path


def make_scheduler(name: str, base_config: Any) -> Any:
    """A sampler `name` (one of SCHEDULERS) on the base model's noise schedule (`base_config`)."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(base_config, **_SCHEDULER_OVERRIDES)


def _as_crop_batch(x: torch.Tensor | np.ndarray | Sequence[Any], what: str) -> torch.Tensor:
    """Aligned crops -> (R, 3, H, W) float in [-1, 1].

    Accepts a (3, H, W) / (R, 3, H, W) tensor in [-1, 1], a uint8 (H, W, 3) / (R, H, W, 3) array,
    or a list of either (one per reference).
    """
    if isinstance(x, (list, tuple)):
        return torch.cat([_as_crop_batch(item, what) for item in x])
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.shape[-1] != 3:
            raise ValueError(f"{what}: numpy crops must be uint8 (..., H, W, 3), got {x.dtype} {x.shape}")
        x = uint8_to_unit(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, uint8 array or list of them, got {type(x).__name__}")
    x = x.float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected (R, 3, H, W) crops, got {tuple(x.shape)}")
    return x


@dataclass
class Identity:
    """One person: reference photos (paths or uint8 (H, W, 3) arrays) or already-aligned crops.

    references: several references are concatenated on the token axis (one Q-Former run).
    mix: interpolation partners with weights: (1 - sum w) * self + sum w_i * partner_i (tokens).
    crops: (recog (R, 3, h, w), clip (R, 3, s, s)) in [-1, 1], aligned like `src.faces.crops_for`;
        when set, `references` is ignored and no face detection runs (`Identity.from_crops`).
    """

    references: list[ImageLike] = field(default_factory=list)
    mix: list[tuple[Identity, float]] = field(default_factory=list)
    crops: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_crops(
        cls, recog: Any, clip: Any | None = None, mix: Sequence[tuple[Identity, float]] = ()
    ) -> Identity:
        """Already aligned crops (tensor in [-1, 1] or uint8 arrays; see `_as_crop_batch`).

        clip=None uses the recognition crop for both branches (each is resized to its branch's size).
        """
        r = _as_crop_batch(recog, "Identity.from_crops(recog)")
        c = r if clip is None else _as_crop_batch(clip, "Identity.from_crops(clip)")
        if r.shape[0] != c.shape[0]:
            raise ValueError(f"Identity.from_crops: {r.shape[0]} recognition crops but {c.shape[0]} CLIP crops")
        return cls(references=[], mix=list(mix), crops=(r, c))


@dataclass
class RoutingMap:
    """Routing of one cross-attention layer at the last denoising step: hard (num_images, N, h, w)."""

    name: str
    hard: torch.Tensor


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    routing_maps: list[RoutingMap] | None = None


class UniPortraitPipeline:
    """Identity-preserving generation with one or several identities.

    Build with `from_components` (networks in memory, adapters already installed and loaded),
    `from_checkpoint` (a checkpoint trained here) or `from_released` (the released .bin files).
    """

    def __init__(
        self, components: Components, id_embedding: IDEmbedding, controlnet: ControlNetModel | None = None
    ) -> None:
        unet = components.unet
        if not adapters.faceid_processors(unet):
            raise ValueError(
                "UniPortraitPipeline: the UNet has no face-ID processors; use from_checkpoint / from_released "
                "or convert.prepare_unet + load the adapter weights first"
            )
        face, clip = components.face, components.clip
        if id_embedding.id_dim != face.intrinsic_dim or id_embedding.structure_dim != face.structure_dim + clip.width:
            raise ValueError(
                f"ID embedding expects id_dim={id_embedding.id_dim}, structure_dim={id_embedding.structure_dim}; the "
                f"encoders give {face.intrinsic_dim} and {face.structure_dim} + {clip.width}"
            )
        self.identity = IdentityEncoder(face, clip, id_embedding.eval()).eval()
        if id_embedding.output_dim != unet.config.cross_attention_dim:
            raise ValueError(f"ID embedding output_dim={id_embedding.output_dim}, but the {components.arch} UNet's "
                             f"cross_attention_dim is {unet.config.cross_attention_dim}")
        self.components = components
        self.arch = components.arch
        self.base_scheduler_config = components.scheduler.config
        self.pipe = arch.build_pipeline(components, make_scheduler("ddim", self.base_scheduler_config), controlnet)
        self.controlnet = controlnet
        self._detector: FaceDetector | None = None
        self._fuse = False
        self._fused: str | None = None
        self._unmerged: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (LoRA base weight, its copy)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_components(
        cls, components: Components, id_embedding: IDEmbedding, controlnet: ControlNetModel | None = None
    ) -> UniPortraitPipeline:
        """Networks already built; the UNet carries the face-ID processors and LoRA(s) with weights."""
        return cls(components, id_embedding, controlnet)

    @classmethod
    def from_checkpoint(
        cls, components: ComponentPaths, checkpoint: str | Path, controlnet: ControlNetModel | None = None
    ) -> UniPortraitPipeline:
        """Base networks from `components`, adapters from our ``.ckpt`` or its ``.safetensors`` export.

        A checkpoint that records its architecture (sd15 / sdxl) and meets a base model of the other one is
        an error naming both and the file, before any network loads."""
        ck = convert.read_checkpoint(checkpoint)
        base_arch = components.arch
        arch.check_arch(ck.arch, base_arch, checkpoint, components.base_model)
        nets = components.build()
        embedding = convert.id_embedding_from_state_dict(
            ck.embedding, dim_head=int(ck.qformer.get("dim_head", 64)), source=str(checkpoint)
        )
        try:
            embedding.load_state_dict(ck.embedding, strict=True)
        except RuntimeError as err:
            raise KeyError(f"{checkpoint}: ID embedding weights do not fit: {err}") from err
        convert.prepare_unet(nets.unet, id_dim=embedding.output_dim, num_tokens=embedding.num_queries,
                             lora_rank=ck.lora_rank, multi=ck.stage == 2)
        try:
            adapters.load_adapter_state_dict(nets.unet, ck.unet, strict=True)
        except (KeyError, ValueError) as err:
            hint = arch.mismatch_hint(base_arch) if ck.arch is None else ""
            raise type(err)(f"{checkpoint}: {err}{hint}") from err
        return cls(nets, embedding, controlnet)

    @classmethod
    def from_released(
        cls,
        components: ComponentPaths,
        faceid_path: str | Path,
        router_path: str | Path | None = None,
        controlnet: ControlNetModel | None = None,
        dim_head: int | None = None,
    ) -> UniPortraitPipeline:
        """Base networks from `components`, adapters from released-layout files (weights_only): the released
        SD1.5 files, or an SDXL export (`src.inference.arch`). Files made for the other architecture than the
        base model's are an error naming both. `dim_head`: the Q-Former head width; None reads it from the
        file's metadata (SDXL exports), else 64 (the released model)."""
        base_arch = components.arch
        for path in filter(None, (faceid_path, router_path)):
            arch.check_arch(arch.released_arch(path), base_arch, path, components.base_model)
        sections = convert.read_released(faceid_path)
        if "faceid_proj" not in sections or "faceid_adapter" not in sections:
            raise KeyError(f"{faceid_path}: expected sections 'faceid_proj' and 'faceid_adapter', "
                           f"got {sorted(sections)}")
        if dim_head is None:
            dim_head = int(arch.file_metadata(faceid_path).get("dim_head", 64))
        embedding = convert.id_embedding_from_state_dict(sections["faceid_proj"], dim_head, source=str(faceid_path))
        rank = convert.released_lora_rank(sections["faceid_adapter"], str(faceid_path))
        nets = components.build()
        convert.prepare_unet(nets.unet, id_dim=embedding.output_dim, num_tokens=embedding.num_queries,
                             lora_rank=rank, multi=router_path is not None)
        convert.load_released(faceid_path, router_path, nets.unet, embedding)
        return cls(nets, embedding, controlnet)

    # ------------------------------------------------------------------ device / speed
    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> UniPortraitPipeline:
        """Move every network (and cast to `dtype` when given)."""
        self._unfuse()  # the next call merges again, into the moved weights
        self._unmerged = None
        self.pipe.to(device=device, dtype=dtype)
        self.identity.to(device=device, dtype=dtype)
        return self

    def fuse_lora(self, enabled: bool = True) -> None:
        """Merge the active LoRA into the base weights for each call (faster steps; peft merge).

        The merged adapter is swapped (unmerge + merge) when a call needs the other one. Unmerging restores
        the base weights from a copy kept on the CPU (subtracting the merged LoRA again would leave rounding
        behind at every swap, which a long-running server accumulates). `enabled=False` unmerges and goes back
        to the separate LoRA branch.
        """
        self._fuse = enabled
        if not enabled:
            self._unfuse()
            self._unmerged = None

    def _unfuse(self) -> None:
        if self._fused is not None:
            self.pipe.unet.unfuse_lora()
            for weight, copy in self._unmerged or ():
                weight.copy_(copy)  # the exact unmerged weights
            self._fused = None

    def activate_lora(self, name: str | None) -> None:
        """Exactly one LoRA set active (or none); merged into the weights when fusing is on."""
        if self._fuse and self._fused == name and name is not None:
            return
        self._unfuse()
        adapters.set_active_lora(self.pipe.unet, name)
        if self._fuse and name is not None:
            if self._unmerged is None:
                weights = [m.get_base_layer().weight.data for m in self.pipe.unet.modules() if isinstance(m, LoraLayer)]
                self._unmerged = [(w, w.detach().to("cpu", copy=True)) for w in weights]
            self.pipe.unet.fuse_lora(adapter_names=[name])
            self._fused = name

    # ------------------------------------------------------------------ identities
    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = FaceDetector()
        return self._detector

    def _reference_crops(self, identity: Identity) -> tuple[torch.Tensor, torch.Tensor]:
        """recog (R, 3, 112, 112), clip (R, 3, S, S) in [-1, 1] for one identity."""
        if identity.crops is not None:
            return identity.crops
        if not identity.references:
            raise ValueError("Identity has neither reference photos nor crops")
        recogs, clips = [], []
        for i, ref in enumerate(identity.references):
            source = str(ref) if isinstance(ref, (str, Path)) else f"<reference array {i}>"
            image = load_rgb(ref) if isinstance(ref, (str, Path)) else ref
            face = largest_face(image, self.detector, source=source)  # NoFaceError names `source`
            recog, clip = crops_for(image, face, clip_size=CLIP_CROP_SIZE)
            recogs.append(uint8_to_unit(recog))
            clips.append(uint8_to_unit(clip))
        return torch.stack(recogs), torch.stack(clips)

    @torch.no_grad()
    def identity_tokens(self, identity: Identity, beta: float) -> torch.Tensor:
        """Identity tokens (1, Q, D) of one identity, its references and interpolation partners."""
        p = next(self.identity.embedding.parameters())
        recog, clip = self._reference_crops(identity)
        tokens = self.identity(recog[None].to(p.device, p.dtype), clip[None].to(p.device, p.dtype), beta=beta)
        if identity.mix:
            partners = [self.identity_tokens(partner, beta) for partner, _ in identity.mix]
            tokens = mix_identities(tokens, partners, [w for _, w in identity.mix])
        return tokens  # (1, Q, D)

    # ------------------------------------------------------------------ generation
    def _choose_lora(self, num_ids: int, masked: bool) -> str:
        names = adapters.lora_names(self.pipe.unet)
        if num_ids == 1:
            return convert.SINGLE
        if convert.MULTI in names and (masked or adapters.router_parameters(self.pipe.unet)):
            return convert.MULTI
        if masked:
            log.warning("no multi-ID LoRA (stage-1 weights): masked multi-identity generation uses the single-ID LoRA")
            return convert.SINGLE
        raise ValueError(
            f"{num_ids} identities need the routers and the multi-ID LoRA (stage-2 / router weights), "
            "or explicit masks"
        )

    def _masks(self, masks: Any, num_ids: int, batch: int, hw: tuple[int, int]) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).float()
        if m.ndim != 3 or m.shape[0] != num_ids:
            raise ValueError(f"masks must be (N={num_ids}, H, W), got {tuple(m.shape)}")
        if tuple(m.shape[-2:]) != hw:
            m = torch.nn.functional.interpolate(m[None], size=hw, mode="bilinear", align_corners=False)[0]
        return m[None].expand(batch, -1, -1, -1).to(self.device)  # (B, N, H, W)

    @staticmethod
    def _normalised_masks(masks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """(B, N, H, W) -> weights at latent resolution normalised over identities (as the processors)."""
        m = torch.nn.functional.interpolate(masks, size=latent_hw, mode="bilinear", align_corners=False)
        total = m.sum(dim=1, keepdim=True)
        return torch.where(total > 0, m / total.clamp_min(1e-12), torch.zeros_like(m))

    def __call__(
        self,
        prompt: str,
        identities: Sequence[Identity],
        negative_prompt: str = "",
        faceid_scale: float = 0.7,
        structure_scale: float | None = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 25,
        scheduler: str = "ddim",
        seed: int = 0,
        num_images: int = 1,
        masks: torch.Tensor | np.ndarray | None = None,
        height: int | None = None,
        width: int | None = None,
        return_routing_maps: bool = False,
        progress: bool = True,
        lora_scale: float = 1.0,
        control_image: Any = None,
        controlnet_conditioning_scale: float = 1.0,
    ) -> PipelineOutput:
        """Generate `num_images` images of `identities` following `prompt`.

        structure_scale: beta of the Q-Former; None = 0.1 for one identity, 0.3 for several (demo).
        masks: optional explicit identity masks (N, H, W) at image resolution replacing the routers.
        lora_scale: scale of the active LoRA (0 = base UNet weights; must be 1 while LoRA is fused).
        control_image: the ControlNet condition (required iff the pipeline has a ControlNet).
        Returns images and, with `return_routing_maps`, the last step's hard routing per
        cross-attention layer (cond branch; (num_images, N, h, w)); for masked generation one entry
        "explicit_masks" with the normalised masks at latent resolution.
        """
        identities = list(identities)
        n = len(identities)
        if n == 0:
            raise ValueError("at least one Identity is required")
        if (self.controlnet is None) != (control_image is None):
            raise ValueError("control_image is required with a ControlNet pipeline and only there")
        beta = structure_scale if structure_scale is not None else (0.1 if n == 1 else 0.3)
        vae_f = self.pipe.vae_scale_factor
        height = height or self.pipe.unet.config.sample_size * vae_f
        width = width or self.pipe.unet.config.sample_size * vae_f
        latent_hw = (height // vae_f, width // vae_f)
        do_cfg = guidance_scale > 1.0

        cond = torch.cat([self.identity_tokens(idn, beta) for idn in identities])  # (N, Q, D)
        tokens = cond[None].expand(num_images, -1, -1, -1)  # (B, N, Q, D)
        if do_cfg:
            with torch.no_grad():
                uncond = self.identity.uncond_tokens(n, beta=beta).to(cond)  # (N, Q, D)
            tokens = torch.cat([uncond[None].expand(num_images, -1, -1, -1), tokens])  # (2B, N, Q, D)
        batch = tokens.shape[0]
        mask_t = None if masks is None else self._masks(masks, n, batch, (height, width))  # (2B|B, N, H, W)
        lora = self._choose_lora(n, mask_t is not None)
        if lora_scale == 0:
            self.activate_lora(None)
        else:
            if self._fuse and lora_scale != 1.0:
                raise ValueError(f"lora_scale={lora_scale} with fused LoRA; call fuse_lora(False) first")
            self.activate_lora(lora)
        record = RoutingRecord() if (return_routing_maps and n > 1 and mask_t is None) else None
        ctx = FaceIDContext(tokens=tokens, latent_hw=latent_hw, scale=faceid_scale, masks=mask_t, record=record)
        kwargs: dict[str, Any] = {"faceid": ctx}
        if lora_scale not in (0.0, 1.0):
            kwargs["scale"] = lora_scale
        last: list[RoutingMap] = []

        def keep_last_step(pipe: Any, i: int, t: Any, cb: dict[str, Any]) -> dict[str, Any]:
            if record is not None:  # keep only the maps of the latest step
                last[:] = [RoutingMap(nm, h[-num_images:].detach().cpu()) for nm, h in zip(record.names, record.hard)]
                record.clear()
            return {}

        self.pipe.scheduler = make_scheduler(scheduler, self.base_scheduler_config)
        self.pipe.set_progress_bar_config(disable=not progress, desc="denoising")
        extra = {} if control_image is None else {"image": control_image,
                                                   "controlnet_conditioning_scale": controlnet_conditioning_scale}
        out = self.pipe(
            prompt=prompt, negative_prompt=arch.negative_prompt_for(self.arch, negative_prompt, do_cfg),
            height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, num_images_per_prompt=num_images,
            generator=torch.Generator().manual_seed(seed), cross_attention_kwargs=kwargs,
            callback_on_step_end=keep_last_step, output_type="pil", **extra,
        )
        maps: list[RoutingMap] | None = None
        if return_routing_maps:
            if mask_t is not None:
                maps = [RoutingMap("explicit_masks", self._normalised_masks(mask_t[-num_images:], latent_hw).cpu())]
            elif n == 1:
                maps = [RoutingMap("single_identity", torch.ones(num_images, 1, *latent_hw))]
            else:
                maps = last
        return PipelineOutput(images=list(out.images), routing_maps=maps)
