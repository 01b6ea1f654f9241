"""The preparation driver: `prepare(cfg)` streams the inputs into shard slots, skips completed shards, processes
the rest and writes the manifest (see the package docstring for the whole contract)."""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from datamodules.captions import VLMCaptioner, load_caption_table
from datamodules.prepare.config import PrepareConfig, PrepareError, validate_config
from datamodules.prepare.image import CaptionSources, process_item
from datamodules.prepare.shards import (
    MANIFEST,
    SHARD_PATTERN,
    ShardRun,
    check_completed,
    load_manifest,
    summarise,
    write_json_atomic,
)
from datamodules.prepare.sources import SourceItem, enumerate_inputs
from src.faces import FaceDetector


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
            self._detector = FaceDetector(min_prob=0.0, min_size=0.0, device=self.cfg.device)
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


def write_shard(
    out: Path, name: str, slot: Iterable[tuple[int, SourceItem]], rt: Runtime, bar: tqdm
) -> tuple[dict, int]:
    """Process the inputs of one shard slot (streamed) and write it; returns (manifest entry, inputs)."""
    run = ShardRun(out, name)
    try:
        for index, item in slot:
            run.add(item.key, process_item(index, item, rt.detector, rt.captions, rt.cfg))
            bar.update(1)
        return run.commit(), run.stats["inputs"]
    except BaseException:
        run.abort()
        raise


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
    rt = Runtime(cfg, table)
    processed, seconds = 0, 0.0
    with tqdm(total=total, unit="img", desc="prepare", dynamic_ncols=True) as bar:
        slots = itertools.groupby(enumerate(items), key=lambda t: t[0] // cfg.samples_per_shard)
        seen: set[str] = set()
        for shard_index, slot in slots:
            name = SHARD_PATTERN.format(shard_index)
            seen.add(name)
            entry = manifest["shards"].get(name)
            if entry is not None and (out / name).is_file():
                keys = [it.key for _, it in slot]  # completed: read keys only, decode nothing
                check_completed(out, name, entry, keys)
                bar.update(len(keys))
                continue
            _ = rt.detector  # build the model outside the timed region
            t0 = time.perf_counter()
            manifest["shards"][name], n = write_shard(out, name, slot, rt, bar)
            seconds += time.perf_counter() - t0
            processed += n
            summarise(manifest)
            write_json_atomic(out / MANIFEST, manifest)
    stale = sorted(set(manifest["shards"]) - seen)
    if stale:
        raise PrepareError(f"{out / MANIFEST}: lists {stale} but the inputs now fill fewer shards; use a new --out")
    summarise(manifest)
    rate = processed / seconds if seconds > 0 else 0.0
    manifest["throughput"] = {
        "images": processed,
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 3),
        "torch_threads": torch.get_num_threads(),
    }
    manifest["finished"] = True
    write_json_atomic(out / MANIFEST, manifest)
    print(
        f"prepared {manifest['kept']} of {manifest['inputs']} images into {len(manifest['shards'])} shard(s) "
        f"in {out}; dropped {manifest['dropped']}; this run: {processed} images, {rate:.2f} images/s"
    )
    return manifest
