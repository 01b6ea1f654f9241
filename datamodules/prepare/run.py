"""The preparation driver: `prepare(cfg)` streams the inputs into shard slots, skips completed shards, processes
the rest (in this process, one shard per task in --workers spawned processes, or one shard per Ray task with
--distributor ray, datamodules/prepare/distributed.py) and writes the manifest (see the package docstring for
the whole contract)."""
from __future__ import annotations

import itertools
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import torch
from tqdm import tqdm

from datamodules.captions import VLMCaptioner, load_caption_table
from datamodules.prepare.config import PrepareConfig, PrepareError, validate_config
from datamodules.prepare.image import CaptionSources, decode_and_detect, process_item
from datamodules.prepare.shards import (
    MANIFEST,
    SHARD_PATTERN,
    ShardRun,
    check_completed,
    load_manifest,
    summarise,
)
from datamodules.prepare.sources import SourceItem, enumerate_inputs
from src.faces import FaceDetector
from src.paths import write_json_atomic


@dataclass
class Runtime:
    """Lazily built heavy objects (not needed when every shard is already complete)."""

    cfg: PrepareConfig
    table: dict[str, str] = field(default_factory=dict)
    _detector: FaceDetector | None = None
    _captions: CaptionSources | None = None

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = FaceDetector(min_prob=0.0, min_size=0.0, device=self.cfg.device,
                                          detect_size=self.cfg.detect_size,
                                          channels_last=self.cfg.detect_channels_last)
        return self._detector

    @property
    def captions(self) -> CaptionSources:
        if self._captions is None:
            captioner = (
                VLMCaptioner(self.cfg.captioner, prompt=self.cfg.captioner_prompt, device=self.cfg.device)
                if self.cfg.captioner
                else None
            )
            self._captions = CaptionSources(self.table, captioner)
        return self._captions


def chunks(slot: Iterable[tuple[int, SourceItem]], size: int) -> Iterator[list[tuple[int, SourceItem]]]:
    """Consecutive lists of `size` (the last may be shorter) from a streamed slot."""
    it = iter(slot)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def write_shard(
    out: Path, name: str, slot: Iterable[tuple[int, SourceItem]], rt: Runtime, progress: Callable[[int], object]
) -> tuple[dict, int]:
    """Process the inputs of one shard slot (streamed, in chunks of --detect-batch whose detection is batched)
    and write it; returns (manifest entry, inputs). `progress(n)` is told of every processed input."""
    run = ShardRun(out, name)
    try:
        for chunk in chunks(slot, rt.cfg.detect_batch):
            decoded = decode_and_detect([item for _, item in chunk], rt.detector, rt.cfg)
            for (index, item), dec in zip(chunk, decoded):
                run.add(item.key, process_item(index, item, rt.detector, rt.captions, rt.cfg, dec))
                progress(1)
        return run.commit(), run.stats["inputs"]
    except BaseException:
        run.abort()
        raise


# ----------------------------------------------------------------------------------------------
# worker processes (--workers > 1, or Ray's with --distributor ray): each incomplete shard is one task;
# the main process keeps the manifest

_WORKER: dict = {}


def init_worker(cfg: PrepareConfig, table: dict[str, str], progress: Any = None) -> None:
    """Worker start-up: one torch thread, its own lazily built detector and captioner; `progress` (a queue,
    or None) is told of every processed input."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    _WORKER.update(rt=Runtime(cfg, table), progress=progress.put if progress is not None else _ignore)


def _ignore(n: int) -> None:
    """No progress reports (a Ray task's progress is counted when it completes)."""


def worker_shard(name: str, slot: list[tuple[int, SourceItem]]) -> tuple[dict, int]:
    """The per-shard task in a worker set up by `init_worker`: write shard `name`; (manifest entry, inputs)."""
    rt: Runtime = _WORKER["rt"]
    return write_shard(Path(rt.cfg.out), name, slot, rt, _WORKER["progress"])


def _drain(queue: Any, bar: tqdm) -> None:
    while True:
        try:
            bar.update(queue.get_nowait())
        except Empty:
            return


def run_parallel(
    cfg: PrepareConfig, table: dict[str, str], tasks: Iterator[tuple[str, Iterable]], bar: tqdm,
    done: Callable[[str, dict, int], None],
) -> None:
    """Run the shard tasks in cfg.workers spawned processes (at most 2 per worker queued, so streamed inputs
    are not all held in memory); `done(name, entry, inputs)` is called in the main process as each completes."""
    ctx = multiprocessing.get_context("spawn")  # CUDA-safe, and no fork of a process holding torch threads
    queue = ctx.Queue()
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=init_worker,
                             initargs=(cfg, table, queue)) as pool:
        pending: dict[Future, str] = {}
        try:
            for name, slot in tasks:
                pending[pool.submit(worker_shard, name, list(slot))] = name
                while len(pending) >= 2 * cfg.workers:
                    _collect(pending, queue, bar, done)
            while pending:
                _collect(pending, queue, bar, done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    _drain(queue, bar)


def _collect(pending: dict[Future, str], queue: Any, bar: tqdm, done: Callable[[str, dict, int], None]) -> None:
    """Wait a little for a task; record those finished (a worker's exception is raised here)."""
    finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
    _drain(queue, bar)
    for fut in finished:
        name = pending.pop(fut)
        done(name, *fut.result())


# ----------------------------------------------------------------------------------------------
# the driver


def shard_tasks(
    cfg: PrepareConfig, out: Path, manifest: dict, items: Iterable[SourceItem], bar: tqdm, seen: set[str]
) -> Iterator[tuple[str, Iterable[tuple[int, SourceItem]]]]:
    """(shard name, its streamed slot of (index, item)) for every shard still to write; completed shards are
    checked (same inputs) and skipped, and every shard name is added to `seen`."""
    slots = itertools.groupby(enumerate(items), key=lambda t: t[0] // cfg.samples_per_shard)
    for shard_index, slot in slots:
        name = SHARD_PATTERN.format(shard_index)
        seen.add(name)
        entry = manifest["shards"].get(name)
        if entry is not None and (out / name).is_file():
            keys = [it.key for _, it in slot]  # completed: read keys only, decode nothing
            check_completed(out, name, entry, keys)
            bar.update(len(keys))
            continue
        yield name, slot


def prepare(cfg: PrepareConfig) -> dict:
    """Run the preparation (resuming in cfg.out) and return the manifest."""
    validate_config(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out, cfg)
    manifest["finished"] = False
    table = load_caption_table(cfg.captions) if cfg.captions else {}  # a bad file fails before detection
    total, items = enumerate_inputs(cfg)
    processed, seconds, workers = 0, 0.0, cfg.workers
    seen: set[str] = set()

    def done(name: str, entry: dict, n: int) -> None:
        nonlocal processed
        manifest["shards"][name] = entry
        processed += n
        summarise(manifest)
        write_json_atomic(out / MANIFEST, manifest)

    with tqdm(total=total, unit="img", desc="prepare", dynamic_ncols=True) as bar:
        tasks = shard_tasks(cfg, out, manifest, items, bar, seen)
        if cfg.distributor == "ray":
            from datamodules.prepare.distributed import run_ray  # ray is imported only when asked for

            t0 = time.perf_counter()  # wall time, Ray start-up (local instance, worker model load) included
            workers = run_ray(cfg, table, tasks, bar, done, (init_worker, worker_shard))
            seconds = time.perf_counter() - t0 if processed else 0.0
        elif cfg.workers == 1:
            rt = Runtime(cfg, table)
            for name, slot in tasks:
                _ = rt.detector  # build the model outside the timed region
                t0 = time.perf_counter()
                entry, n = write_shard(out, name, slot, rt, bar.update)
                seconds += time.perf_counter() - t0
                done(name, entry, n)
        else:
            t0 = time.perf_counter()  # wall time, worker start-up (spawn, model load) included
            run_parallel(cfg, table, tasks, bar, done)
            seconds = time.perf_counter() - t0 if processed else 0.0
    stale = sorted(set(manifest["shards"]) - seen)
    if stale:
        raise PrepareError(f"{out / MANIFEST}: lists {stale} but the inputs now fill fewer shards; use a new --out")
    summarise(manifest)
    rate = processed / seconds if seconds > 0 else 0.0
    manifest["throughput"] = {
        "images": processed,
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 3),
        "workers": workers,
        "distributor": cfg.distributor,
        "torch_threads": 1 if workers > 1 or cfg.distributor == "ray" else torch.get_num_threads(),
        "detect_size": cfg.detect_size,
        "detect_batch": cfg.detect_batch,
        "device": cfg.device,
    }
    manifest["finished"] = True
    write_json_atomic(out / MANIFEST, manifest)
    print(
        f"prepared {manifest['kept']} of {manifest['inputs']} images into {len(manifest['shards'])} shard(s) "
        f"in {out}; dropped {manifest['dropped']}; this run: {processed} images, {rate:.2f} images/s "
        f"({workers} worker(s), {cfg.distributor}, detection at {cfg.detect_size or 'full'} px, "
        f"batches of {cfg.detect_batch})"
    )
    return manifest
