"""Streaming WebDataset pipeline over face shards (datamodules/schema.py) and the batch collate.

Per worker, the stream is::

    shard URLs --(seeded shard shuffle, identical on every rank)--> split by rank --> split by worker
      (or, resampled: an endless seeded draw of shards per rank and worker;
       or, validation: split by worker only, then every rank keeps every world_size-th sample of its worker,
       so each rank validates on its share however few the shards are)
    --> tar samples --> seeded shuffle buffer --> decode_sample --> face selection --> crop --> item
      (with buckets: --> per-bucket buffers --> batch of items)

Stage 1 (``multi_id=False``) keeps the largest face; with probability ``p_other_reference`` its recognition crop
is replaced by a recent crop of the same identity from another image (a small per-worker cache), while the CLIP
crop always comes from the target. Stage 2 (``multi_id=True``) keeps up to ``max_faces`` faces (the largest).
A sample that raises ``SampleError`` (or a tar read error) is skipped, counted and logged (rate-limited); items
carry ``skipped`` = how many samples this worker skipped since its previous item (a worker's last item also
carries the skips after it), so the module can log skip totals without shared state. Arrays are checked
(:func:`check_arrays`: uint8 crops of the right shape, binary masks; float arrays, NaN or out-of-range values
are a ``SampleError``), and a shard that holds no sample is a counted, logged skip naming the shard.

Data position (resume): :class:`EpochLoader` is stateful (``state_dict`` = epoch and batches consumed in it,
saved by Lightning in the fit loop's checkpoint state). A resumed loader skips that many batches of the same
deterministic stream, so the next batch is the one the interrupted run would have trained on. Workers take
the logical id ``(worker + skipped batches) % num_workers`` so the DataLoader's round-robin over workers
continues where it stopped.

Aspect-ratio buckets (``StreamConfig.buckets``, `datamodules.buckets`): each sample is cropped to the bucket
closest to its aspect ratio and the worker groups items into batches of one bucket (a buffer per bucket,
partial buffers flushed at the end of the pass), so the dataset then yields whole batches (lists of items;
the DataLoader runs without its own batching) and its per-worker cap and resume skip count batches, as the
DataLoader's round-robin does.

Items are batched by :func:`datamodules.collate.collate_faces` (the batch contract is in that module); the
sample checks are in `datamodules.checks`.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.buckets import Bucket, batch_by_bucket, training_frame
from datamodules.checks import check_arrays, latent_problem
from datamodules.collate import collate_faces
from datamodules.latents import size_conditioning
from datamodules.schema import Sample, SampleError, decode_sample
from datamodules.transforms import crop_window, eval_face_crop, random_face_crop
from src.paths import is_local

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- shard URLs
def resolve_shards(pattern: str) -> list[str]:
    """Expand a shard pattern into URLs and check the local ones exist.

    Accepts brace expansion (``train-{000000..000009}.tar``), several patterns joined by ``::``, ``pipe:``
    commands and remote URLs (passed through unchecked), and a local directory (all ``*.tar`` in it, sorted).
    Raises FileNotFoundError naming the pattern when it is empty, expands to nothing, or names missing files.
    """
    if not pattern or not pattern.strip():
        raise FileNotFoundError(f"shard pattern is empty ({pattern!r})")
    urls: list[str] = []
    for url in wds.shardlists.expand_urls(pattern.strip()):
        path = url[len("file:"):] if url.startswith("file:") else url
        if is_local(url) and os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
            if not found:
                raise FileNotFoundError(f"shard pattern {pattern!r}: directory {path!r} holds no .tar shards")
            urls.extend(found)
        else:
            urls.append(url)
    missing = [u for u in urls if is_local(u) and not os.path.exists(u[len("file:"):] if u.startswith("file:") else u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} shard(s) do not exist, e.g. {missing[:3]}{more}"
        )
    if not urls:
        raise FileNotFoundError(f"shard pattern {pattern!r} expands to no shards")
    return urls


def split_by_rank(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Every `world_size`-th element starting at `rank` (webdataset.split_by_node with an explicit rank).

    The rank is captured in the main process (Lightning's trainer or torch.distributed) when the dataset is
    built: inside a DataLoader worker torch.distributed may not be initialised (spawned workers).
    """
    return islice(src, rank, None, world_size) if world_size > 1 else iter(src)


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ---------------------------------------------------------------------------------------------- items
@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs to build its stream (picklable; rank/world captured at build time)."""

    urls: tuple[str, ...]
    multi_id: bool = False
    max_faces: int = 3
    resolution: int = 512
    shuffle: bool = True
    shuffle_buffer: int = 1000
    seed: int = 0
    p_other_reference: float = 0.0
    resampled: bool = False
    random_crop: bool = True
    min_crop_scale: float = 0.6
    rank: int = 0
    world_size: int = 1
    epoch_batches: int | None = None  # batches per epoch on this rank (None: until the shards run out)
    split_samples: bool = False  # ranks share every shard and take every world_size-th sample (validation)
    batch_size: int = 1
    cache_per_identity: int = 4
    cache_identities: int = 1024
    cached_latents: bool = False  # read `latent.npz` (datamodules.latent_cache) and crop with its window
    buckets: tuple[Bucket, ...] | None = None  # (h, w) frames (datamodules.buckets); None: R x R squares


class SkipCounter:
    """Counts skipped samples of one worker and logs them: the first 10 messages, then every 1000th."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.pending = 0  # skipped since the last yielded item
        self.total = 0

    def skip(self, reason: str) -> None:
        self.pending += 1
        self.total += 1
        if self.total <= 10 or self.total % 1000 == 0:
            log.warning("%s: skipped sample #%d: %s", self.where, self.total, reason)

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler: count the failure and continue with the next sample/shard."""
        self.skip(f"{type(exn).__name__}: {exn}")
        return True


class ReferenceCache:
    """Recent (key, recognition crop) pairs per identity, for stage 1's other-image references (per worker)."""

    def __init__(self, per_identity: int, max_identities: int) -> None:
        self.per_identity = per_identity
        self.max_identities = max_identities
        self._crops: OrderedDict[str, deque[tuple[str, np.ndarray]]] = OrderedDict()

    def pick_other(self, identity: str, key: str, rng: np.random.Generator) -> tuple[str, np.ndarray] | None:
        """A cached crop of `identity` from an image other than `key`, or None."""
        others = [e for e in self._crops.get(identity, ()) if e[0] != key]
        return others[int(rng.integers(len(others)))] if others else None

    def add(self, identity: str, key: str, crop: np.ndarray) -> None:
        entries = self._crops.setdefault(identity, deque(maxlen=self.per_identity))
        entries.append((key, crop))
        self._crops.move_to_end(identity)
        while len(self._crops) > self.max_identities:
            self._crops.popitem(last=False)


def _box_area(box: list[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def select_faces(sample: Sample, keep: int) -> tuple[Sample, int]:
    """Keep the `keep` largest faces (by box area) in their original order; returns (sample, faces dropped)."""
    n = len(sample.faces)
    if n <= keep:
        return sample, 0
    largest = sorted(range(n), key=lambda i: -_box_area(sample.faces[i].box))[:keep]
    idx = sorted(largest)
    sub = replace(
        sample, faces=[sample.faces[i] for i in idx], masks=sample.masks[idx], recog=sample.recog[idx],
        clip=sample.clip[idx],
    )
    return sub, n - keep


def frame_of(sample: Sample, cfg: StreamConfig) -> Bucket:
    """The training frame (h, w) of a sample (`buckets.training_frame`): (resolution, resolution), or with
    buckets the bucket closest to the image's aspect ratio."""
    return training_frame(*sample.image.shape[:2], cfg.resolution, cfg.buckets)


def sample_to_item(sample: Sample, cfg: StreamConfig, rng: np.random.Generator, training: bool) -> dict[str, Any]:
    """Crop/resize a selected Sample into the per-sample item that `collate_faces` batches.

    The frame is (resolution, resolution), or with buckets the bucket closest to the image's aspect ratio.
    With cached latents the crop is the cached latent's window (the one it was encoded from), so image, masks
    and latent agree; the item then carries `latents` (C, h/f, w/f) and `latent_scaling`.
    """
    cached = sample.extra.get("latent") if cfg.cached_latents else None
    size = frame_of(sample, cfg)
    if cached is not None:
        sample = crop_window(sample, *cached.box, cached.frame)
    elif training and cfg.random_crop:
        sample = random_face_crop(sample, size, rng, cfg.min_crop_scale)
    else:
        sample = eval_face_crop(sample, size)
    item = {
        "image": sample.image,  # uint8 (h, w, 3)
        "caption": sample.caption,
        "recog": sample.recog,  # uint8 (n, 112, 112, 3)
        "clip": sample.clip,  # uint8 (n, S, S, 3)
        "masks": sample.masks,  # uint8 (n, h, w)
        "identity": [f.identity for f in sample.faces],
        "reference_key": [sample.key] * len(sample.faces),
        "key": sample.key,
        "original_size": sample.extra["original_size"],  # (H, W) of the source image
        "crop_top_left": sample.extra["crop_top_left"],  # (top, left) of the crop, scaled to the frame
    }
    if cached is not None:
        item["latents"] = cached.latent  # float16 (C, h/f, w/f)
        item["latent_scaling"] = cached.scaling_factor
    return item


def swap_reference(item: dict[str, Any], cache: ReferenceCache, p: float, rng: np.random.Generator) -> None:
    """Stage 1: with probability p use another image's recognition crop of the same identity (in place)."""
    identity = item["identity"][0] if item["identity"] else None
    if identity is None:
        return
    own = item["recog"][0]
    if p > 0 and rng.uniform() < p:
        other = cache.pick_other(identity, item["key"], rng)
        if other is not None:
            item["recog"] = other[1][None]  # (1, 112, 112, 3)
            item["reference_key"] = [other[0]]
    cache.add(identity, item["key"], own)


# ---------------------------------------------------------------------------------------------- dataset
def _seeded_shuffle(src: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Shuffle buffer of `size` items driven by `rng` (deterministic for a seed)."""
    buf: list[Any] = []
    for x in src:
        buf.append(x)
        if len(buf) >= size:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _carry_tail_skips(items: Iterator[dict[str, Any]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Yield items one behind, so the worker's last item also carries the skips that came after it."""
    prev = None
    for item in items:
        if prev is not None:
            yield prev
        prev = item
    if prev is not None:
        prev["skipped"] += counter.take()
        yield prev


class FaceShardDataset(IterableDataset):
    """Iterable over face shards; yields per-sample items (see module docstring). `set_epoch` reseeds."""

    def __init__(self, cfg: StreamConfig, training: bool = True) -> None:
        super().__init__()
        if not cfg.urls:
            raise FileNotFoundError("FaceShardDataset: no shard URLs")
        self.cfg = cfg
        self.training = training
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed (resume); set by EpochLoader

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_position(self, batches: int) -> None:
        """Start the next pass after `batches` batches of the epoch (the same batches are skipped, not re-drawn)."""
        if batches < 0:
            raise ValueError(f"FaceShardDataset.set_position: batches={batches} must be >= 0")
        self.skip_batches = int(batches)

    def __len__(self) -> int:
        """Elements per epoch on this rank (samples; batches with buckets); only with a fixed epoch length."""
        if self.cfg.epoch_batches is None:
            raise TypeError("FaceShardDataset has no length without epoch_length")
        return self.cfg.epoch_batches * self._per_batch()

    def _shards(self, worker: int, num_workers: int) -> Iterator[dict[str, str]]:
        """Shard URLs of (logical) `worker`: an endless seeded draw (resampled) or its split of this rank's share."""
        cfg = self.cfg
        if cfg.resampled:
            rng = np.random.default_rng([cfg.seed, self.epoch, cfg.rank, worker, 7])
            while True:
                yield {"url": cfg.urls[int(rng.integers(len(cfg.urls)))]}
        urls = list(cfg.urls)
        if cfg.shuffle:  # the same permutation on every rank and worker, before splitting
            np.random.default_rng([cfg.seed, self.epoch, 3]).shuffle(urls)
        # split by rank (captured at build time; by sample instead: see __iter__), then by the logical worker id
        by_rank = urls if cfg.split_samples else split_by_rank(urls, cfg.rank, cfg.world_size)
        for url in islice(by_rank, worker, None, num_workers):
            yield {"url": url}

    def _samples(self, shards: Iterable[dict[str, str]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Raw tar samples shard by shard; a shard holding no sample is a counted skip naming it.

        Resampled streams are endless: if every one of many consecutive shards is empty or unreadable, raise
        (naming one) instead of spinning forever.
        """
        empty_in_a_row, limit = 0, max(16, 4 * len(self.cfg.urls))
        for shard in shards:
            before, n = counter.total, 0
            for raw in wds.tarfile_to_samples(handler=counter.handler)(iter([shard])):
                n += 1
                yield raw
            if n == 0 and counter.total == before:
                counter.skip(f"{shard['url']}: shard holds no samples (empty tar)")
            empty_in_a_row = 0 if n else empty_in_a_row + 1
            if empty_in_a_row >= limit:
                raise RuntimeError(f"{empty_in_a_row} shards in a row held no readable sample (last: "
                                   f"{shard['url']!r}); check the shard pattern")

    def _per_batch(self) -> int:
        """Dataset elements per batch: items, or 1 with buckets (the dataset yields whole batches)."""
        return 1 if self.cfg.buckets else self.cfg.batch_size

    def _worker_cap(self, worker: int, num_workers: int) -> int | None:
        """Elements this worker yields per epoch: its share of the rank's batches, times `_per_batch`."""
        if self.cfg.epoch_batches is None:
            return None
        e = self.cfg.epoch_batches
        return (e // num_workers + (1 if worker < e % num_workers else 0)) * self._per_batch()

    def _worker_skip(self, worker: int, num_workers: int) -> int:
        """Elements (logical) `worker` skips on resume: its round-robin share of the consumed batches."""
        k = self.skip_batches
        return (k // num_workers + (1 if worker < k % num_workers else 0)) * self._per_batch()

    def __iter__(self) -> Iterator[dict[str, Any] | list[dict[str, Any]]]:
        cfg = self.cfg
        physical, num_workers = worker_info()
        # after k consumed batches the DataLoader restarts its round-robin at physical worker 0, which must
        # continue the stream of the worker whose turn it was: logical id = (physical + k) % num_workers
        worker = (physical + self.skip_batches) % num_workers
        where = f"rank {cfg.rank} worker {worker}"
        counter = SkipCounter(where)
        rng = np.random.default_rng([cfg.seed, self.epoch, cfg.rank, worker, 11])
        raw: Iterable[dict[str, Any]] = self._samples(self._shards(worker, num_workers), counter)
        if cfg.split_samples:  # every rank reads this worker's shards and keeps its own samples of them
            raw = split_by_rank(raw, cfg.rank, cfg.world_size)
        if self.training and cfg.shuffle and cfg.shuffle_buffer > 1:
            raw = _seeded_shuffle(raw, cfg.shuffle_buffer, rng)
        items = _carry_tail_skips(self._items(raw, rng, counter, where), counter)
        elements = batch_by_bucket(items, cfg.batch_size) if cfg.buckets else items
        cap = self._worker_cap(worker, num_workers)
        # resume: replay (decode, crop, draw) and drop the consumed items so every RNG is where it was
        yield from islice(elements, self._worker_skip(worker, num_workers), cap)
        if counter.total:
            log.info("%s: %d sample(s) skipped this epoch", where, counter.total)

    def _items(
        self, raw: Iterable[dict[str, Any]], rng: np.random.Generator, counter: SkipCounter, where: str
    ) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        keep = cfg.max_faces if cfg.multi_id else 1
        cache = ReferenceCache(cfg.cache_per_identity, cfg.cache_identities)
        warned_drop, derived = False, 0
        for r in raw:
            try:
                sample = decode_sample(r)
                check_arrays(sample, f"{r.get('__url__', '?')}:{sample.key}")
            except SampleError as e:
                counter.skip(str(e))
                continue
            if not sample.faces:
                counter.skip(f"{r.get('__url__', '?')}:{sample.key}: no face")
                continue
            if cfg.cached_latents:
                reason = latent_problem(sample, frame_of(sample, cfg))
                if reason:
                    counter.skip(f"{r.get('__url__', '?')}:{sample.key}: {reason}")
                    continue
            url = r.get("__url__", "?")
            try:  # geometry that decodes but cannot be used (e.g. a box of 2 numbers) is bad data, not a crash
                sample, dropped = select_faces(sample, keep)
                item = sample_to_item(sample, cfg, rng, self.training)
                if cfg.cached_latents and not size_conditioning(
                        sample.extra["latent"], item["original_size"], item["crop_top_left"], f"{url}:{sample.key}"):
                    derived += 1
                    if derived == 1:
                        log.warning("%s: %s predates the cached original_size/crop_top_left; deriving them from "
                                    "the stored crop box (re-run python -m datamodules.latent_cache to store them)",
                                    where, url)
            except SampleError as e:
                counter.skip(str(e))
                continue
            except (ValueError, IndexError, TypeError) as e:
                counter.skip(f"{r.get('__url__', '?')}:{sample.key}: unusable faces/masks ({type(e).__name__}: {e})")
                continue
            if dropped and cfg.multi_id and not warned_drop:
                warned_drop = True
                log.warning("%s: %s has %d faces; keeping the %d largest (max_faces). Logged once per worker.",
                            where, sample.key, keep + dropped, keep)
            if self.training and not cfg.multi_id:
                swap_reference(item, cache, cfg.p_other_reference, rng)
            item["skipped"] = counter.take()
            yield item
        if derived:
            log.info("%s: %d cached latent(s) without stored size conditioning (derived from their box)", where,
                     derived)


# ---------------------------------------------------------------------------------------------- loader
class EpochLoader(DataLoader):
    """DataLoader that tells its FaceShardDataset the epoch before each pass (new shuffle, same seed), and a
    stateful one (Lightning saves `state_dict()` in checkpoints and calls `load_state_dict()` on resume).

    `epoch_source` (e.g. ``lambda: trainer.current_epoch``) gives the epoch; without it, passes are counted.
    `position_source` gives the batches of the current epoch already trained on (e.g. the fit loop's
    processed-batch count: the loader itself runs ahead of training by Lightning's prefetch); without it,
    the batches this loader yielded in the current pass. Workers are not persistent, so every pass ships the
    updated epoch and position to fresh workers.
    """

    def __init__(self, dataset: FaceShardDataset, epoch_source: Callable[[], int] | None = None,
                 position_source: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.epoch_source = epoch_source
        self.position_source = position_source
        self.passes = 0
        self._epoch = 0
        self._yielded = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch_source() if self.epoch_source is not None else self.passes
        skip = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            skip = self._resume["batches"]  # a checkpoint of another (earlier) epoch means: start this one fresh
        self._resume = None
        self.dataset.set_epoch(epoch)
        self.dataset.set_position(skip)
        self.passes += 1
        self._epoch, self._yielded = epoch, skip
        if skip:
            log.info("resuming epoch %d after %d consumed batch(es): replaying the stream to that position",
                     epoch, skip)
        return self._count(super().__iter__())

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "batches"}: the data position (batches of that epoch already trained on)."""
        batches = self.position_source() if self.position_source is not None else self._yielded
        return {"epoch": int(self._epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume at `state_dict()`'s position: the next pass of the same epoch skips the consumed batches."""
        if not {"epoch", "batches"} <= set(state_dict):
            raise KeyError(f"EpochLoader state needs 'epoch' and 'batches', got {sorted(state_dict)}")
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


def make_loader(
    dataset: FaceShardDataset, batch_size: int, num_workers: int, epoch_source: Callable[[], int] | None = None,
    position_source: Callable[[], int] | None = None, pin_memory: bool = False, prefetch_factor: int | None = None,
) -> EpochLoader:
    """The DataLoader over a FaceShardDataset with `collate_faces` (no sampler: the dataset splits itself).
    With buckets the dataset yields whole batches, so the DataLoader does not batch (batch_size=None).
    Workers are not persistent (see EpochLoader); `prefetch_factor` applies only with workers."""
    return EpochLoader(
        dataset, epoch_source=epoch_source, position_source=position_source,
        batch_size=None if dataset.cfg.buckets else batch_size,
        num_workers=num_workers, collate_fn=collate_faces, persistent_workers=False, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
