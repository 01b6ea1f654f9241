"""Identity metrics during training: Face Sim, CLIP-I (and routing accuracy in stage 2, the multi-person
metrics of `src.metrics.multi_id` on a multi-ID batch) on a small fixed validation batch, logged to
TensorBoard every `every_n_steps` optimizer steps.

Images come from the module's public `sample_images(batch, ...)`; routing from its public
`routing_maps(batch, t)`. References are the batch's own aligned face crops (the identities the
images were generated from).

Two frozen networks are read from the module as *read-only public submodules* when no independent
network is configured (the only access beyond public methods, documented here):
- recognizer="tiny" without `face_backbone`: the module's own frozen face backbone
  (`pl_module.identity.face`), wrapped in `src.evaluation.synthetic_recognizer.SyntheticFaceRecognizer`;
- no `clip_checkpoint`: CLIP-I from the module's own frozen CLIP tower (`pl_module.identity.clip`,
  mean of its patch tokens), logged as `val_id/clip_i_own_tower` (not the paper's CLIP-I);
  with `clip_model` + `clip_checkpoint` (open_clip, local file) it is logged as `val_id/clip_i`.
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from src.conventions import to_clip_pixels, uint8_to_unit
from src.metrics import RANK_LOCAL, ClipScore, FaceSimilarity, MultiIdentityMetrics, RoutingAccuracy, multi_id_score
from src.metrics.face import as_reference_matrix, image_face_score, images_to_uint8

log = logging.getLogger(__name__)

ROUTING_TIMESTEPS = (100, 400, 700)  # one timestep per band below 750 (inference-relevant)


class OwnTowerClip(nn.Module):
    """A `ClipScore`-compatible wrapper of the module's frozen CLIP patch encoder: encode_image(pixels)
    = mean of its (B, G*G, W) patch tokens -> (B, W). Not the CLIP embedding of the paper's CLIP-I."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    @torch.no_grad()
    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.tower(pixels).mean(dim=1)  # (B, W)

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL image -> (3, S, S) CLIP-normalised pixels at the tower's input size."""
        x = uint8_to_unit(np.asarray(image.convert("RGB")))  # (3, H, W) in [-1, 1]
        return to_clip_pixels(x[None], self.tower.image_size)[0]


def is_multi_id(batch: dict[str, Any]) -> bool:
    """Whether `batch` is multi-ID (stage-2) data: more than one face slot per sample (`face_valid` (B, N),
    N = the most faces of any sample in the collated batch; stage-1 batches keep one face, N = 1)."""
    return batch["face_valid"].shape[1] > 1


def slice_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first n samples of a collated batch (tensors and lists)."""
    return {k: (v[:n] if isinstance(v, (Tensor, list, tuple)) else v) for k, v in batch.items()}


class IdentityMetrics(L.Callback):
    """Face Sim / CLIP-I / routing accuracy of generated images on a fixed validation batch.

    every_n_steps: interval in optimizer steps (at global_step % every_n_steps == 0, rank 0 only).
    num_images: samples of the first validation batch used (fixed for the whole run).
    num_inference_steps, guidance_scale, faceid_scale, seed: sampling settings (module.sample_images).
    recognizer: "tiny" (the synthetic world's backbone, sliding-window detector), "dlib" (pretrained,
        offline) or "facenet" (needs facenet_weights).
    face_backbone (+ face_num_layers, face_widths, face_embedding_size): an independent backbone file
        for "tiny"; None = the module's own frozen backbone.
    calibration_identities, calibration_renders: synthetic training identities (default syn_0..syn_7)
        and number of renders the tiny detector is calibrated on.
    clip_model, clip_checkpoint: an open_clip model for CLIP-I; None = the module's own CLIP tower.
    Logged (to every logger, e.g. TensorBoard, at the current step): val_id/face_sim, val_id/no_face_rate,
    val_id/clip_i[_own_tower], and in stage 2 val_id/routing_acc (+ val_id/face_count_ok,
    val_id/duplicate_rate on multi-face samples). On a multi-ID batch (`is_multi_id`) also every key of
    `src.metrics.MultiIdentityMetrics` as val_id/multi/<key> (sim_matched, sim_mht, leakage, id_conf,
    count_acc, duplicate_rate, face_sim, no_face_rate, num_images), a nan mean left out. An image one of whose
    references shows no face the recogniser finds is left out of the face figures and counted as
    val_id/unscored_images (the face figures are not logged when no image was scored).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_images: int = 4,
        num_inference_steps: int = 10,
        recognizer: str = "tiny",
        guidance_scale: float = 3.0,
        faceid_scale: float = 1.0,
        seed: int = 0,
        face_backbone: str | None = None,
        face_num_layers: int = 18,
        face_widths: tuple[int, int, int, int] = (16, 32, 64, 128),
        face_embedding_size: int = 128,
        calibration_identities: list[int] | None = None,
        calibration_renders: int = 12,
        facenet_weights: str | None = None,
        clip_model: str | None = None,
        clip_checkpoint: str | None = None,
    ) -> None:
        if recognizer not in ("tiny", "dlib", "facenet"):
            raise ValueError(f"IdentityMetrics: recognizer must be 'tiny', 'dlib' or 'facenet', got {recognizer!r}")
        if (clip_model is None) != (clip_checkpoint is None):
            raise ValueError("IdentityMetrics: clip_model and clip_checkpoint go together")
        if every_n_steps < 1 or num_images < 1:
            raise ValueError(f"IdentityMetrics: every_n_steps={every_n_steps}, num_images={num_images} must be >= 1")
        self.every_n_steps, self.num_images, self.num_inference_steps = every_n_steps, num_images, num_inference_steps
        self.recognizer_name, self.guidance_scale, self.faceid_scale, self.seed = (
            recognizer, guidance_scale, faceid_scale, seed)
        self.face_backbone = face_backbone
        self.face_arch = (face_num_layers, tuple(face_widths), face_embedding_size)
        self.calibration_identities = list(calibration_identities or range(8))
        self.calibration_renders = calibration_renders
        self.facenet_weights = facenet_weights
        self.clip_model, self.clip_checkpoint = clip_model, clip_checkpoint
        self._batch: dict[str, Any] | None = None
        self._recognizer: Any = None
        self._clip: tuple[nn.Module, Any, str] | None = None
        self.last: dict[str, float] = {}
        self._measured_at: int | None = None

    # ------------------------------------------------------------------ lazily built parts
    def fixed_batch(self, trainer: L.Trainer) -> dict[str, Any] | None:
        if self._batch is None:
            dm = trainer.datamodule
            first = dm.preview_batch() if hasattr(dm, "preview_batch") else None
            if first is None:  # no DataModule, or no sample
                return None
            self._batch = slice_batch(first, self.num_images)  # of val_shards, else of the training shards
        return self._batch

    def recognizer(self, pl_module: L.LightningModule, image_size: int) -> Any:
        if self._recognizer is None:
            if self.recognizer_name == "tiny":
                from src.evaluation.synthetic_recognizer import SyntheticFaceRecognizer

                if self.face_backbone is not None:
                    from src.models.face_backbone import load_face_backbone

                    backbone = load_face_backbone(self.face_backbone, *self.face_arch).to(pl_module.device)
                else:
                    backbone = pl_module.identity.face  # read-only: the frozen backbone (see module docstring)
                self._recognizer = SyntheticFaceRecognizer(backbone, self.calibration_identities, image_size,
                                                           num_calibration=self.calibration_renders, seed=self.seed)
            else:
                from src.recognizers import build_recognizer

                self._recognizer = build_recognizer(self.recognizer_name, weights=self.facenet_weights)
        return self._recognizer

    def clip(self, pl_module: L.LightningModule) -> tuple[nn.Module, Any, str]:
        if self._clip is None:
            if self.clip_checkpoint is not None:
                from src.metrics import load_open_clip

                model, preprocess, _ = load_open_clip(self.clip_model, self.clip_checkpoint,
                                                      device=str(pl_module.device))
                self._clip = (model, preprocess, "val_id/clip_i")
            else:
                own = OwnTowerClip(pl_module.identity.clip)  # read-only: the frozen CLIP tower
                self._clip = (own, own.preprocess, "val_id/clip_i_own_tower")
        return self._clip

    # ------------------------------------------------------------------ measuring
    def reference_embedding(self, rec: Any, crop: Tensor) -> Tensor | None:
        """(3, 112, 112) aligned crop in [-1, 1] -> (D,) reference embedding (None: no face found)."""
        arr = images_to_uint8(crop[None].cpu())[0]
        return rec.embed_aligned(arr) if hasattr(rec, "embed_aligned") else rec.embed_reference(arr)

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule, batch: dict[str, Any]) -> dict[str, float]:
        """Sample images for `batch` and score them; returns the logged numbers (0..1 scale, cosines in -1..1).

        Each image is detected once (`embed_faces`) and scored against its own sample's references by
        `FaceSimilarity` and, on a multi-ID batch (`is_multi_id`), by `MultiIdentityMetrics` too."""
        images = pl_module.sample_images(batch, num_inference_steps=self.num_inference_steps,
                                         guidance_scale=self.guidance_scale, faceid_scale=self.faceid_scale,
                                         seed=self.seed)["images"].cpu()  # (B, 3, H, W)
        rec = self.recognizer(pl_module, int(images.shape[-1]))
        valid = batch["face_valid"].cpu()  # (B, N)
        face = FaceSimilarity(rec, **RANK_LOCAL)
        multi = MultiIdentityMetrics(**RANK_LOCAL) if is_multi_id(batch) else None
        model, preprocess, clip_key = self.clip(pl_module)
        clip = ClipScore(model, preprocess, **RANK_LOCAL)
        scored, unscored = 0, 0
        for b, array in enumerate(images_to_uint8(images)):
            slots = valid[b].nonzero().flatten().tolist()
            refs = [self.reference_embedding(rec, batch["face_recog"][b, n]) for n in slots]
            if refs and all(r is not None for r in refs):
                faces, _boxes = rec.embed_faces(array)  # (K, D) largest first, (K, 4)
                ref_matrix = as_reference_matrix(refs)  # (R, D), L2-normalised
                face.add_score(image_face_score(faces, ref_matrix))
                if multi is not None:
                    multi.add_score(multi_id_score(faces, ref_matrix))
                scored += 1
            else:  # a reference the recogniser finds no face in: scoring the others alone would flatter the image
                unscored += 1
            clip.update(images[b : b + 1].expand(len(slots), -1, -1, -1),
                        references=batch["face_clip"][b, slots].cpu())
        out = {f"val_id/{k}": float(v) for k, v in face.compute().items()} if scored else {}
        out["val_id/unscored_images"] = float(unscored)
        out[clip_key] = float(clip.compute()["clip_i"]) / 100
        if multi is not None and int(multi.num_images) > 0:
            # a mean no image contributed to (sim_matched with no face found, leakage with no unmatched
            # pair) is nan: left out, so the curves show gaps instead of nan points
            out.update({f"val_id/multi/{k}": float(v) for k, v in multi.compute().items() if not torch.isnan(v)})
        if pl_module.stage == 2:
            out["val_id/routing_acc"] = self.routing_accuracy(pl_module, batch)
        return out

    def routing_accuracy(self, pl_module: L.LightningModule, batch: dict[str, Any]) -> float:
        """Routing accuracy (all layers, ROUTING_TIMESTEPS) from the module's public routing_maps()."""
        metric = RoutingAccuracy(**RANK_LOCAL)
        inputs = pl_module.probe_inputs(batch)  # shared by the forwards of every timestep
        for t in ROUTING_TIMESTEPS:
            out = pl_module.routing_maps(batch, t, seed=self.seed, inputs=inputs)
            for hard in out["hard"]:
                metric.update(hard.cpu(), out["masks"].cpu(), out["valid"].cpu(), torch.full((hard.shape[0],), t))
        return float(metric.compute()["all"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        if trainer.global_step == self._measured_at:  # accumulated batches of one optimizer step: once
            return
        self._measured_at = trainer.global_step
        fixed = self.fixed_batch(trainer)
        if fixed is None:
            return
        fixed = pl_module.transfer_batch_to_device(fixed, pl_module.device, 0)
        self.last = self.measure(pl_module, fixed)
        for logger in trainer.loggers:  # directly: independent of the trainer's log_every_n_steps
            logger.log_metrics(self.last, step=trainer.global_step)
        log.info("identity metrics at step %d: %s", trainer.global_step,
                 ", ".join(f"{k}={v:.3f}" for k, v in self.last.items()))
