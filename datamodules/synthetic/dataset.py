"""Writing the synthetic dataset: its options (`SyntheticConfig`), the six splits, their shards (in this process
or over a pool of worker processes, the same bytes either way) and the manifest (`generate`); and aligned crops
of new renders for pretraining the tiny face backbone (`render_identity_crops`)."""
from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from datamodules.schema import SCHEMA_VERSION, Sample, encode_sample
from datamodules.synthetic.canonical import CanonicalFace, FaceCache, canonical_px, render_canonical
from datamodules.synthetic.identities import IdentityParams, identity_label, identity_params
from datamodules.synthetic.scene import render_sample
from src.conventions import FACE_RECOG_SIZE

SPLITS = ("single_train", "multi_train", "single_seen", "single_unseen", "multi_seen", "multi_unseen")


@dataclass
class SyntheticConfig:
    """Options of the synthetic dataset (the CLI flags of `python -m datamodules.synthetic`)."""

    size: int = 64
    identities: int = 64  # training identities: syn_0 .. syn_{identities-1}
    unseen: int = 16  # held-out identities: syn_{identities} .. syn_{identities+unseen-1}
    single: int = 4000
    multi: int = 3000
    heldout: int = 200  # images per held-out split
    max_faces: int = 3
    samples_per_shard: int = 500
    seed: int = 0
    clip_size: int = 112
    crop_scale: int = 4  # aligned crops cut from the scene rendered at this multiple of `size` (render_sample)
    jpeg_quality: int = 95
    progress: bool = True
    # Processes rendering shards (1: this process). Every sample depends only on (seed, split, index) and
    # its identities, so the shards are the same bytes whatever the count (a test checks it).
    workers: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent option."""
        if self.size < 16:
            raise ValueError(f"size={self.size}: images must be at least 16 px")
        if self.identities < 1:
            raise ValueError(f"identities={self.identities}: need at least one training identity")
        if self.multi and self.identities < 2:
            raise ValueError(f"multi={self.multi} needs identities >= 2 (got {self.identities})")
        if self.max_faces < 2 and (self.multi or self.heldout):
            raise ValueError(f"max_faces={self.max_faces}: multi-face images need at least 2")
        if self.heldout and self.unseen < 2:
            raise ValueError(f"heldout={self.heldout} needs unseen >= 2 for multi_unseen (got {self.unseen})")
        if self.crop_scale < 1:
            raise ValueError(f"crop_scale={self.crop_scale} must be >= 1 (1 cuts the crops from the image itself)")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard} must be >= 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1")


@dataclass(frozen=True)
class SplitSpec:
    name: str  # key in the manifest
    folder: str
    prefix: str
    count: int
    ids: tuple[int, ...]  # identities this split draws from
    multi: bool


def split_specs(cfg: SyntheticConfig) -> list[SplitSpec]:
    """The six splits of the dataset (count 0 splits are listed and written as empty)."""
    seen = tuple(range(cfg.identities))
    unseen = tuple(range(cfg.identities, cfg.identities + cfg.unseen))
    return [
        SplitSpec("single_train", "single", "train", cfg.single, seen, False),
        SplitSpec("multi_train", "multi", "train", cfg.multi, seen, True),
        SplitSpec("single_seen", "heldout", "single_seen", cfg.heldout, seen, False),
        SplitSpec("single_unseen", "heldout", "single_unseen", cfg.heldout, unseen, False),
        SplitSpec("multi_seen", "heldout", "multi_seen", cfg.heldout, seen, True),
        SplitSpec("multi_unseen", "heldout", "multi_unseen", cfg.heldout, unseen, True),
    ]


def _identity_lists(rng: np.random.Generator, spec: SplitSpec, max_faces: int) -> list[list[int]]:
    """Identities of every image: balanced cycling for single-face splits, distinct draws for multi-face ones."""
    ids = np.asarray(spec.ids)
    if not spec.multi:
        reps = -(-spec.count // len(ids))
        order = np.concatenate([rng.permutation(ids) for _ in range(reps)])[: spec.count]
        return [[int(k)] for k in order]
    top = min(max_faces, len(ids))
    return [
        [int(k) for k in rng.choice(ids, size=int(rng.integers(2, top + 1)), replace=False)]
        for _ in range(spec.count)
    ]


def iter_split(
    spec: SplitSpec, cfg: SyntheticConfig, cache: FaceCache, start: int = 0, stop: int | None = None
) -> Iterator[Sample]:
    """Samples start..stop-1 of one split; sample i depends only on (seed, split, i) and its identities."""
    split_code = SPLITS.index(spec.name)
    identity_lists = _identity_lists(np.random.default_rng([cfg.seed, split_code]), spec, cfg.max_faces)
    for i in range(start, len(identity_lists) if stop is None else min(stop, len(identity_lists))):
        rng = np.random.default_rng([cfg.seed, split_code, i, 1])
        yield render_sample(rng, identity_lists[i], cfg.size, cfg.clip_size, f"{spec.prefix}_{i:07d}", cache,
                            cfg.crop_scale)


def shard_pattern(prefix: str, n_shards: int) -> str:
    """Brace pattern for shards prefix-000000.tar .. prefix-{n-1}.tar (a single name when n == 1)."""
    if n_shards <= 1:
        return f"{prefix}-000000.tar"
    return f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar"


def _n_shards(spec: SplitSpec, cfg: SyntheticConfig) -> int:
    return -(-spec.count // cfg.samples_per_shard) if spec.count else 0


def _write_shard(spec: SplitSpec, shard: int, cfg: SyntheticConfig, out: Path, cache: FaceCache) -> int:
    """Write shard `shard` of a split through a temporary name, renamed when complete; returns its sample count."""
    folder = out / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{spec.prefix}-{shard:06d}.tar"
    tmp = final.with_name(final.name + ".tmp")
    start = shard * cfg.samples_per_shard
    n = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0)  # fixed mtime: reproducible tar bytes
        for sample in iter_split(spec, cfg, cache, start, start + cfg.samples_per_shard):
            writer.write(encode_sample(sample, jpeg_quality=cfg.jpeg_quality))
            n += 1
        writer.close()
    os.replace(tmp, final)
    return n


# Worker-process state: the canonical renders, sent once per worker (not once per shard).
_WORKER_CACHE = FaceCache()


def _init_worker(faces: dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]]) -> None:
    global _WORKER_CACHE
    _WORKER_CACHE = FaceCache(faces)


def _write_shard_in_worker(spec: SplitSpec, shard: int, cfg: SyntheticConfig, out: Path) -> int:
    return _write_shard(spec, shard, cfg, out, _WORKER_CACHE)


def _canonical_pair(k: int, pxs: tuple[int, ...]) -> dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]]:
    ip = identity_params(k)
    return {(k, px): (ip, render_canonical(ip, px)) for px in pxs}


def _pool(workers: int, **kwargs) -> ProcessPoolExecutor:
    # spawn: the parent may already run torch's thread pool, which a forked child must not inherit
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), **kwargs)


def _write_splits(specs: list[SplitSpec], cfg: SyntheticConfig, out: Path, bar: tqdm | None,
                  cache: FaceCache | None = None) -> None:
    """Every shard of every split: in this process (workers == 1, drawing faces into `cache`), or over
    `cfg.workers` processes that first draw every identity's canonical faces between them."""
    jobs = [(spec, shard) for spec in specs for shard in range(_n_shards(spec, cfg))]
    if cfg.workers == 1:
        cache = FaceCache() if cache is None else cache
        for spec, shard in jobs:
            n = _write_shard(spec, shard, cfg, out, cache)
            if bar is not None:
                bar.update(n)
        return
    pxs = tuple(sorted({canonical_px(cfg.size), canonical_px(cfg.size * cfg.crop_scale)}))
    ids = sorted({k for spec in specs if spec.count for k in spec.ids})
    faces: dict[tuple[int, int], tuple[IdentityParams, CanonicalFace]] = {}
    with _pool(cfg.workers) as ex:
        for part in ex.map(_canonical_pair, ids, [pxs] * len(ids), chunksize=max(1, len(ids) // (4 * cfg.workers))):
            faces.update(part)
    with _pool(cfg.workers, initializer=_init_worker, initargs=(faces,)) as ex:
        # the largest shards first, so the last ones to finish are short
        futures = [ex.submit(_write_shard_in_worker, spec, shard, cfg, out)
                   for spec, shard in sorted(jobs, key=lambda j: -j[0].multi)]
        for fut in as_completed(futures):
            n = fut.result()
            if bar is not None:
                bar.update(n)


def _split_entry(spec: SplitSpec, cfg: SyntheticConfig, out: Path) -> dict[str, object]:
    n_shards = _n_shards(spec, cfg)
    pattern = f"{spec.folder}/{shard_pattern(spec.prefix, n_shards)}" if n_shards else None
    if not n_shards:
        (out / spec.folder).mkdir(parents=True, exist_ok=True)
    return {
        "count": spec.count, "shards": n_shards, "pattern": pattern,
        "path_pattern": str(out / pattern) if pattern else None,
        "identities": [identity_label(k) for k in spec.ids], "multi": spec.multi,
    }


def generate(out: Path, cfg: SyntheticConfig, cache: FaceCache | None = None) -> dict:
    """Generate the whole dataset under `out` and write `out/manifest.json`; returns the manifest dict.

    `cache`: canonical renders to reuse and add to (with one worker), e.g. shared with `render_identity_crops`."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = split_specs(cfg)
    total = sum(s.count for s in specs)
    bar = tqdm(total=total, desc="synthetic faces", unit="img", disable=not cfg.progress)
    _write_splits(specs, cfg, out, bar, cache)
    bar.close()
    splits = {spec.name: _split_entry(spec, cfg, out) for spec in specs}
    manifest = {
        "schema": SCHEMA_VERSION,
        "generator": "datamodules.synthetic",
        "seed": cfg.seed,
        "options": {k: v for k, v in asdict(cfg).items() if k != "workers"},  # same bytes whatever the count
        "identities": {
            "train": [identity_label(k) for k in range(cfg.identities)],
            "unseen": [identity_label(k) for k in range(cfg.identities, cfg.identities + cfg.unseen)],
        },
        "counts": {name: s["count"] for name, s in splits.items()},
        "splits": splits,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def render_identity_crops(
    identity_ids: Sequence[int], n_per_id: int, seed: int = 0, size: int = 64, crop_scale: int = 4, workers: int = 1,
    cache: FaceCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned recognition crops of new single-face renders, for pretraining the tiny face backbone.

    Returns crops uint8 (M, 112, 112, 3) with M = len(identity_ids) * n_per_id, ordered identity-major, and
    labels int64 (M,) holding the identity index k of ``syn_<k>`` (the class index when ids == range(C)).
    Images are drawn like the dataset's (same nuisance) at `size` px, the crops cut like the dataset's (from the
    scene at `crop_scale` x `size`, see `render_sample`). Crop (k, j) depends only on (seed, k, j): `workers`
    processes, each drawing a contiguous run of identities, return the same arrays as one; with one, `cache`
    holds canonical renders to reuse and add to.
    """
    ids = [int(k) for k in identity_ids]
    if workers > 1 and len(ids) > 1:
        chunks = [c.tolist() for c in np.array_split(np.asarray(ids), min(workers, len(ids)))]
        with _pool(len(chunks)) as ex:
            parts = list(ex.map(render_identity_crops, chunks, [n_per_id] * len(chunks), [seed] * len(chunks),
                                [size] * len(chunks), [crop_scale] * len(chunks)))
        return np.concatenate([c for c, _ in parts]), np.concatenate([lb for _, lb in parts])
    cache = FaceCache() if cache is None else cache
    crops, labels = [], []
    for k in ids:
        for j in range(n_per_id):
            rng = np.random.default_rng([seed, 1000, k, j])
            s = render_sample(rng, [k], size, FACE_RECOG_SIZE, f"crop_{k}_{j}", cache, crop_scale)
            crops.append(s.recog[0])
            labels.append(k)
    empty = np.zeros((0, FACE_RECOG_SIZE, FACE_RECOG_SIZE, 3), np.uint8)
    return (np.stack(crops) if crops else empty), np.asarray(labels, dtype=np.int64)
