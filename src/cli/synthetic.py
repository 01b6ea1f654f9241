"""`uniportrait-synthetic` / `python -m datamodules.synthetic`: generate the synthetic identity dataset
(datamodules/synthetic/) as WebDataset shards."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from datamodules.synthetic.dataset import SyntheticConfig, generate
from src.cli import exit_status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic",
        description="Generate the synthetic identity dataset (procedurally drawn faces) as WebDataset shards.",
    )
    d = SyntheticConfig()
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    p.add_argument("--identities", type=int, default=d.identities, help="number of training identities")
    p.add_argument("--unseen", type=int, default=d.unseen, help="held-out identities never used in training")
    p.add_argument("--single", type=int, default=d.single, help="single-face training images")
    p.add_argument("--multi", type=int, default=d.multi, help="multi-face training images")
    p.add_argument("--heldout", type=int, default=d.heldout, help="images per held-out split")
    p.add_argument("--max-faces", type=int, default=d.max_faces, help="maximum faces per multi-face image")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--clip-size", type=int, default=d.clip_size, help="side of the aligned CLIP crop")
    p.add_argument("--crop-scale", type=int, default=d.crop_scale,
                   help="cut the aligned crops from the scene rendered at this multiple of --size (1: from the image)")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes rendering shards (default: one per core); the output is the same bytes")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    cfg = SyntheticConfig(
        size=a.size, identities=a.identities, unseen=a.unseen, single=a.single, multi=a.multi, heldout=a.heldout,
        max_faces=a.max_faces, samples_per_shard=a.samples_per_shard, seed=a.seed, clip_size=a.clip_size,
        crop_scale=a.crop_scale, jpeg_quality=a.jpeg_quality, progress=not a.no_progress, workers=a.workers,
    )
    manifest = generate(a.out, cfg)
    for name, s in manifest["splits"].items():
        print(f"{name:14s} {s['count']:6d} images  {s['pattern']}")
    return manifest


def console() -> None:
    """Console script `uniportrait-synthetic`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
