"""`uniportrait-latent-cache` / `python -m datamodules.latent_cache`: cache VAE latents in the shards
(datamodules/latents.py; its docstring's first paragraph is the --help description)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import datamodules.latents as latents
from datamodules.buckets import BUCKET_PRESETS, Bucket, resolve_buckets
from datamodules.latents import DISTRIBUTORS, cache_shards
from datamodules.loader import resolve_shards
from src.cli import exit_status
from src.paths import is_local


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datamodules.latent_cache",
                                description=latents.__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="input shard pattern (brace expansion, directory, ...)")
    p.add_argument("--vae", required=True, help="diffusers base-model directory (or its vae/ folder)")
    frame = p.add_mutually_exclusive_group(required=True)
    frame.add_argument("--resolution", type=int, help="training resolution R (data.resolution): R x R crops")
    frame.add_argument("--buckets", help="aspect-ratio buckets (data.buckets): a preset (sdxl_1024) or a list "
                                         "HxW,HxW,... (e.g. 1024x1024,896x1152); each image at its nearest bucket")
    p.add_argument("--out", required=True, help="output directory (shards keep their file names; its "
                                                "latent_cache.json lists the finished ones, so a re-run resumes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the VAE runs (with --distributor ray: in every task, one GPU each for cuda)")
    p.add_argument("--distributor", choices=DISTRIBUTORS, default="local",
                   help="local: this process; ray: a Ray task per shard (datamodules/latents_ray.py)")
    p.add_argument("--ray-address", default=None,
                   help="with --distributor ray: the cluster's address (auto or HOST:PORT); none: a local instance")
    p.add_argument("--workers", type=int, default=1,
                   help="with --distributor ray and no --ray-address: the local instance's CPUs (CPU tasks at once)")
    return p


def parse_buckets(spec: str) -> tuple[Bucket, ...]:
    """--buckets: a preset name, or HxW,HxW,... -> the buckets (SystemExit naming the bad value)."""
    try:
        if spec in BUCKET_PRESETS:
            return resolve_buckets(spec)
        frames = [part.lower().split("x") for part in spec.split(",")]
        if not all(len(f) == 2 and f[0].strip().isdigit() and f[1].strip().isdigit() for f in frames):
            raise ValueError(f"{spec!r} is neither a preset ({sorted(BUCKET_PRESETS)}) nor a list "
                             "HxW,HxW,...")
        buckets = resolve_buckets([[int(h), int(w)] for h, w in frames])
    except ValueError as e:
        raise SystemExit(f"--buckets: {e}") from e
    assert buckets is not None
    return buckets


def main(argv: list[str] | None = None) -> dict[str, int]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    if (a.resolution is not None and a.resolution < 8) or a.batch_size < 1:
        raise SystemExit(f"--resolution must be >= 8 and --batch-size >= 1 (got {a.resolution}, {a.batch_size})")
    buckets = parse_buckets(a.buckets) if a.buckets is not None else None
    try:
        urls = resolve_shards(a.shards)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --shards: {e}") from e
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise SystemExit(f"--shards: only local shard files can be cached, got {remote[0]!r}")
    if a.workers < 1 or (a.ray_address is not None and a.distributor != "ray"):
        raise SystemExit(f"--workers must be >= 1 (got {a.workers}) and --ray-address needs --distributor ray")
    try:
        total = cache_shards(urls, Path(a.out), a.vae, a.resolution, buckets, a.batch_size, a.device,
                             progress=sys.stderr.isatty(), distributor=a.distributor, ray_address=a.ray_address,
                             workers=a.workers)
    except (ValueError, FileNotFoundError) as e:  # names the shard, directory, VAE or setting at fault
        raise SystemExit(f"error: {e}") from e
    print(f"[latent cache] {len(urls)} shard(s) -> {a.out} ({total['written']} written now, {total['skipped']} "
          f"already cached): {total['cached']} latents, {total['copied_without_latent']} sample(s) copied without "
          "one (undecodable; skipped in training)")
    return total


def console() -> None:
    """Console script `uniportrait-latent-cache`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
