"""Throughput of shard preparation (`python -m datamodules.prepare`): the same photos and settings through the old
path (one process, full-resolution MTCNN as facenet-pytorch ships it, one image at a time) and the new ones
(detection on a copy capped at --detect-size, batched over --detect-batch inputs, MTCNN's networks on
channels-last inputs, then --workers processes).

The photos are --images real face photographs (scikit-image's astronaut, matplotlib's Grace Hopper, mirrored and
slightly rotated variants) at --photo-size px on the longer side, or the images of --input. Each row is a fresh
preparation into its own directory; images/s is the wall time of the whole `prepare` call (input listing, model
load and, with workers, process start-up included) and of the processing alone (the manifest's throughput).
Rows run in this process use --threads torch threads; workers use one each.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.benchmarks.steps import write_section

BEGIN, END = "<!-- bench:prepare:begin -->", "<!-- bench:prepare:end -->"


@dataclass(frozen=True)
class Setting:
    """One row: a name and the preparation settings that differ between the paths."""

    name: str
    workers: int
    detect_size: int
    detect_batch: int
    channels_last: bool = True
    distributor: str = "local"


def settings(workers: int, detect_size: int, detect_batch: int, distributor: bool = True) -> list[Setting]:
    """The old path, then each new piece added in turn; last, the same per-shard tasks through the Ray
    distributor on a local instance of `workers` CPUs (its start-up included in the wall time)."""
    rows = [
        Setting("old", 1, 0, 1, channels_last=False),
        Setting("downscaled", 1, detect_size, 1, channels_last=False),
        Setting("downscaled+batched", 1, detect_size, detect_batch, channels_last=False),
        Setting("+channels-last", 1, detect_size, detect_batch),
        Setting(f"workers {workers}", workers, detect_size, detect_batch),
    ]
    if distributor:
        rows.append(Setting(f"ray, {workers} CPUs", workers, detect_size, detect_batch, distributor="ray"))
    return rows


def _resize_long(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = size / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS))


def base_photos(size: int) -> list[np.ndarray]:
    """Two real portraits at `size` px on the longer side."""
    from matplotlib import cbook
    from skimage import data

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        grace = np.asarray(img.convert("RGB"))
    return [_resize_long(data.astronaut(), size), _resize_long(grace, size)]


def make_photos(folder: Path, n: int, size: int) -> Path:
    """`n` JPEG photos in `folder`: the portraits, mirrored and rotated by a few degrees in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    bases = base_photos(size)
    for i in range(n):
        image = bases[i % len(bases)]
        variant = i // len(bases)
        if variant % 2:
            image = image[:, ::-1]
        angle = (variant // 2 % 5 - 2) * 3.0  # -6 .. 6 degrees
        pil = Image.fromarray(np.ascontiguousarray(image)).rotate(angle, resample=Image.Resampling.BILINEAR)
        pil.save(folder / f"{i:06d}.jpg", quality=92)
    return folder


def run_setting(setting: Setting, photos: Path, out: Path, samples_per_shard: int, device: str) -> dict:
    """One fresh preparation of `photos` with `setting`; its row."""
    from datamodules.prepare.config import PrepareConfig
    from datamodules.prepare.run import prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(input=str(photos), format="folder", out=str(out), samples_per_shard=samples_per_shard,
                        workers=setting.workers, detect_size=setting.detect_size,
                        detect_batch=setting.detect_batch, detect_channels_last=setting.channels_last, device=device,
                        distributor=setting.distributor)
    t0 = time.perf_counter()
    manifest = prepare(cfg)
    wall = time.perf_counter() - t0
    tp = manifest["throughput"]
    return {"name": setting.name, "distributor": setting.distributor, "workers": setting.workers,
            "detect_size": setting.detect_size, "channels_last": setting.channels_last,
            "detect_batch": setting.detect_batch, "images": tp["images"], "kept": manifest["kept"],
            "wall_s": wall, "images_per_s": tp["images"] / wall, "processing_images_per_s": tp["images_per_s"]}


def run(photos: Path, work_dir: Path, workers: int, detect_size: int, detect_batch: int, device: str,
        threads: int, distributor: bool = True) -> list[dict]:
    """Every setting on the same photos; shards of ceil(n / (2 * workers)) inputs so that every worker has
    shards to take (the same shard size for every row)."""
    from datamodules.prepare.sources.folder import list_folder

    files = list_folder(photos)
    per_shard = max(1, math.ceil(len(files) / (2 * workers)))
    torch.set_num_threads(threads)
    # untimed warm-up (imports, weights, first-call allocations), so that the first row does not pay for them
    warm = work_dir / "warmup_photo"
    shutil.rmtree(warm, ignore_errors=True)
    warm.mkdir(parents=True)
    (warm / files[0].key).symlink_to((photos / files[0].key).resolve())
    run_setting(Setting("warm-up", 1, 0, 1, channels_last=False), warm, work_dir / "warmup", 1, device)
    return [run_setting(s, photos, work_dir / s.name.replace(" ", "_").replace("+", "_"), per_shard, device)
            for s in settings(workers, detect_size, detect_batch, distributor)]


def table(rows: list[dict]) -> str:
    old = rows[0]["images_per_s"]
    lines = ["| path | distributor | workers | detect size | detect batch | channels-last | images | kept | wall (s) | "
             "images/s | vs old | processing images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = r["detect_size"] or "full"
        lines.append(f"| {r['name']} | {r['distributor']} | {r['workers']} | {size} | {r['detect_batch']} | "
                     f"{'yes' if r['channels_last'] else 'no'} | {r['images']} | "
                     f"{r['kept']} | {r['wall_s']:.2f} | {r['images_per_s']:.2f} | "
                     f"{r['images_per_s'] / old:.2f}x | {r['processing_images_per_s']:.2f} |")
    return "\n".join(lines)


def record(rows: list[dict], doc: Path, photos: str, device: str, threads: int) -> None:
    """Rewrite the benchmark's section of `doc` with the machine, settings, date and table."""
    from src.tiny.assets import cpu_name

    head = (f"Measured {dt.date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} cores), device {device}, "
            f"torch {torch.__version__}, {threads} torch thread(s) in one-process rows, one per worker; "
            f"{photos}; `python -m src.cli.bench_prepare`. images/s: wall time of the whole preparation "
            "(listing, model load, worker start-up included); processing: the manifest's throughput.")
    write_section(doc, BEGIN, END, f"{head}\n\n{table(rows)}", "Shard preparation throughput (`bench_prepare`)")


def photos_for(source: Path | None, images: int, photo_size: int, work_dir: Path) -> tuple[Path, str]:
    """(folder of photos, its description for the record): the first `images` images of `source` (linked),
    else `make_photos`."""
    from datamodules.prepare.sources import IMAGE_EXTENSIONS

    folder = work_dir / "photos"
    shutil.rmtree(folder, ignore_errors=True)
    if source is not None:
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:images]
        if not files:
            raise FileNotFoundError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        folder.mkdir(parents=True)
        for i, p in enumerate(files):
            (folder / f"{i:06d}{p.suffix.lower()}").symlink_to(p.resolve())
        return folder, f"the first {len(files)} photos of {source}"
    make_photos(folder, images, photo_size)
    return folder, f"{images} face photos (astronaut, Grace Hopper, variants) at {photo_size} px"


def scratch_dir(work_dir: Path | None) -> tuple[Path, bool]:
    """(the directory for photos and outputs, whether it is a temporary one to remove)."""
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        return work_dir, False
    return Path(tempfile.mkdtemp(prefix="bench_prepare_")), True
