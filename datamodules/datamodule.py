"""LightningDataModule streaming face shards for stage 1 (single identity) and stage 2 (multi identity).

Batches follow the contract of `datamodules.collate.collate_faces`. The same DataModule serves both stages:
`set_multi_id(True, multi_shards)` (called by a stage-switch callback) makes the next `train_dataloader()` stream
multi-face data with all faces; `state_dict()` records the stage and the shard pattern so a resumed run restores
them.

Frames: square crops at `resolution` (SD1.5's 512), or with `buckets` (e.g. the ``sdxl_1024`` preset) one
aspect-ratio bucket per sample and per batch (`datamodules.buckets`). Every batch carries SDXL's size
conditioning (``original_size``, ``crop_top_left``) computed from the crop.

Distributed: the rank and world size come from the attached trainer (else torch.distributed, else 0/1) when the
dataloader is built; shards are shuffled identically on every rank (seed + epoch), split by rank, then by worker,
so without `resampled` every sample is seen exactly once per epoch across ranks. Ranks may then get different
numbers of batches; for multi-node training use `resampled=True` with `epoch_length` (batches per rank per epoch),
which makes every rank draw shards endlessly (seeded per rank/worker) and stop at the same count.
"""
from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from datamodules.buckets import resolve_buckets
from datamodules.loader import EpochLoader, FaceShardDataset, StreamConfig, make_loader, resolve_shards

log = logging.getLogger(__name__)


def trained_batches(trainer: pl.Trainer) -> int:
    """Batches of the current epoch whose training step ran (the data position a checkpoint records)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


class FaceShardDataModule(pl.LightningDataModule):
    """Streams WebDataset face shards (datamodules/schema.py) into batches of the collate contract.

    Args:
        train_shards: shard pattern: brace expansion, ``::``-joined patterns, a local directory, ``pipe:`` commands.
        val_shards: optional validation pattern (deterministic: no shuffle, no random crop, own crops).
        multi_id: stage 2 (all faces up to `max_faces`) instead of stage 1 (the largest face).
        max_faces: most faces kept per image in stage 2 (the largest; more are dropped and logged once).
        resolution: output image side R; images are (B, 3, R, R).
        batch_size: samples per batch.
        num_workers: DataLoader workers per rank (shards are split between them).
        shuffle_buffer: samples in the shuffle buffer (<= 1 disables sample shuffling; shards still shuffle).
        seed: seeds shard order, buffer, crops and reference swaps (same seed -> same batches on CPU).
        p_other_reference: stage 1 probability of taking the recognition crop from another image of the identity.
        resampled: draw shards with replacement, endlessly (multi-node); pair with `epoch_length`.
        epoch_length: batches per epoch on each rank (None: one pass over this rank's shards).
        random_crop: random face-preserving crops in training (False: the deterministic eval crop).
        pin_memory: page-locked batches for faster host-to-GPU copies (None: when CUDA is available).
        prefetch_factor: batches each worker loads ahead (None: PyTorch's default, 2; needs workers).
        cached_latents: read the VAE latents cached in the shards (`python -m datamodules.latent_cache`) instead
            of letting the module encode images; crops are the cached ones, so `random_crop` must be False.
            Samples without a latent of their frame ((resolution, resolution) or their bucket) are skipped,
            counted and logged.
        buckets: aspect-ratio buckets (`datamodules.buckets`): a preset name (``"sdxl_1024"``) or a list of
            [h, w]; each sample is cropped (faces kept, as the square crop) to the bucket closest to its aspect
            ratio and every batch holds one bucket (images (B, 3, h, w)); `resolution` is then unused. None
            (default): square crops at `resolution`. With `cached_latents`, cache with the same buckets
            (``python -m datamodules.latent_cache --buckets ...``).
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        multi_id: bool = False,
        max_faces: int = 3,
        resolution: int = 512,
        batch_size: int = 8,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        p_other_reference: float = 0.1,
        resampled: bool = False,
        epoch_length: int | None = None,
        random_crop: bool = True,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        cached_latents: bool = False,
        buckets: str | list[list[int]] | None = None,
    ) -> None:
        super().__init__()
        if max_faces < 1:
            raise ValueError(f"max_faces={max_faces} must be >= 1")
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution={resolution} must be a positive multiple of 8 (the VAE's downsampling; "
                             "the SD1.5 and SDXL UNets need multiples of 64)")
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                   ("shuffle_buffer", shuffle_buffer, 0)):
            if value < least:
                raise ValueError(f"{name}={value} must be >= {least}")
        if not 0.0 <= p_other_reference <= 1.0:
            raise ValueError(f"p_other_reference={p_other_reference} must be in [0, 1]")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length={epoch_length} must be >= 1 or None")
        if cached_latents and random_crop:
            raise ValueError("data.cached_latents=true needs data.random_crop=false: the cached latents are of one "
                             "fixed crop per image (see datamodules/latent_cache.py)")
        self.buckets = resolve_buckets(buckets)  # raises naming a bad preset or bucket
        if prefetch_factor is not None and (prefetch_factor < 1 or num_workers == 0):
            raise ValueError(f"prefetch_factor={prefetch_factor} needs num_workers > 0 (got {num_workers}) "
                             "and must be >= 1")
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.multi_id = multi_id
        self.max_faces = max_faces
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.p_other_reference = p_other_reference
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.random_crop = random_crop
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.cached_latents = cached_latents
        self._train_urls: list[str] | None = None
        self._val_urls: list[str] | None = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard patterns; an empty or non-existent local pattern raises naming it."""
        self._train_urls = resolve_shards(self.train_shards)
        self._val_urls = resolve_shards(self.val_shards) if self.val_shards else None
        rank, world = self.rank_and_world()
        if not self.resampled and world > 1:
            log.warning("resampled=False on %d ranks: a rank whose shards hold fewer samples runs out of batches "
                        "first and DDP waits on it at the epoch end; use resampled=True with epoch_length", world)
        if not self.resampled and len(self._train_urls) < world * max(1, self.num_workers):
            log.warning(
                "%d train shard(s) for %d rank(s) x %d worker(s): some workers get no data; use more shards "
                "(a multiple of ranks x workers) or resampled=True", len(self._train_urls), world, self.num_workers,
            )

    def rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size): the trainer's when attached, else torch.distributed's, else (0, 1)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_multi_id(self, multi: bool, train_shards: str | None = None) -> None:
        """Switch stage (and optionally the training shards); the next `train_dataloader()` uses them."""
        if train_shards is not None:
            self._train_urls = resolve_shards(train_shards)  # fail now, naming the pattern, not mid-training
            self.train_shards = train_shards
        self.multi_id = bool(multi)
        log.info("FaceShardDataModule: multi_id=%s, train_shards=%r", self.multi_id, self.train_shards)

    # ------------------------------------------------------------------------------------------ loaders
    def _stream_config(self, urls: list[str], training: bool) -> StreamConfig:
        rank, world = self.rank_and_world()
        return StreamConfig(
            urls=tuple(urls),
            multi_id=self.multi_id,
            max_faces=self.max_faces,
            resolution=self.resolution,
            shuffle=training,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            p_other_reference=self.p_other_reference if training else 0.0,
            resampled=self.resampled and training,
            random_crop=self.random_crop and training,
            rank=rank,
            world_size=world,
            epoch_batches=self.epoch_length if training else None,
            split_samples=not training,  # validation: every rank gets batches, however few the shards
            batch_size=self.batch_size,
            cached_latents=self.cached_latents,
            buckets=self.buckets,
        )

    def train_dataloader(self) -> EpochLoader:
        """Shuffled, split by rank and worker, random crops; the current stage's faces per sample."""
        if self._train_urls is None:
            self._train_urls = resolve_shards(self.train_shards)
        dataset = FaceShardDataset(self._stream_config(self._train_urls, training=True), training=True)
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return make_loader(dataset, self.batch_size, self.num_workers, **self._loader_options())
        return make_loader(
            dataset, self.batch_size, self.num_workers, epoch_source=lambda: int(trainer.current_epoch),
            position_source=lambda: trained_batches(trainer), **self._loader_options(),
        )

    def _loader_options(self) -> dict[str, Any]:
        return {"pin_memory": self.pin_memory, "prefetch_factor": self.prefetch_factor}

    def val_dataloader(self) -> EpochLoader | list:
        """Deterministic validation batches (no shuffle, eval crop); [] without val_shards."""
        if not self.val_shards:
            return []
        if self._val_urls is None:
            self._val_urls = resolve_shards(self.val_shards)
        dataset = FaceShardDataset(self._stream_config(self._val_urls, training=False), training=False)
        return make_loader(dataset, self.batch_size, self.num_workers, epoch_source=lambda: 0, **self._loader_options())

    def preview_dataloader(self) -> EpochLoader | list:
        """The callbacks' fixed batches (routing maps, identity metrics): the validation loader, or without
        val_shards deterministic batches of the training shards (no shuffle, eval crop, this stage's faces,
        read in this process)."""
        if self.val_shards:
            return self.val_dataloader()
        log.info("no data.val_shards: the callbacks' pictures and metrics use the first training samples "
                 "(eval crop, no shuffle)")
        dataset = FaceShardDataset(self._stream_config(resolve_shards(self.train_shards), training=False),
                                   training=False)
        return make_loader(dataset, self.batch_size, 0, epoch_source=lambda: 0, pin_memory=self.pin_memory)

    def preview_batch(self) -> dict[str, Any] | None:
        """The first batch of `preview_dataloader()` (None when the shards hold no usable sample)."""
        return next(iter(self.preview_dataloader()), None)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Stage and data source, saved in checkpoints so a resumed run continues the same stage."""
        return {
            "multi_id": self.multi_id,
            "train_shards": self.train_shards,
            "val_shards": self.val_shards,
            "max_faces": self.max_faces,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stage of `state_dict()` (the next train_dataloader uses it). The configured shard patterns
        win (data moved to another mount, a new validation set), except the training shards of a stage the
        run switched to (`StageSwitch`), which the configuration does not hold."""
        if "multi_id" not in state_dict or "train_shards" not in state_dict:
            raise KeyError(f"FaceShardDataModule state needs 'multi_id' and 'train_shards', got {sorted(state_dict)}")
        saved = state_dict["train_shards"]
        if bool(state_dict["multi_id"]) != self.multi_id:
            log.info("resuming in the stage the run switched to (multi_id=%s): training shards %r from the "
                     "checkpoint", bool(state_dict["multi_id"]), saved)
            self.train_shards = saved
        elif saved != self.train_shards:
            log.info("training shards %r as configured (the checkpoint's run read %r)", self.train_shards, saved)
        if state_dict.get("val_shards") != self.val_shards:
            log.info("validation shards %r as configured (the checkpoint's run read %r)", self.val_shards,
                     state_dict.get("val_shards"))
        self.max_faces = int(state_dict.get("max_faces", self.max_faces))
        self.seed = int(state_dict.get("seed", self.seed))
        self.multi_id = bool(state_dict["multi_id"])
        self._train_urls = None
        self._val_urls = None
