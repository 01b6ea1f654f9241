"""`uniportrait-prepare` / `python -m datamodules.prepare`: turn raw photos, img2dataset-style shards or the
CelebA layout into training shards (datamodules/prepare/; its docstring is the --help text)."""
from __future__ import annotations

import argparse
import sys

import datamodules.prepare as preparation
from datamodules.prepare.config import DISTRIBUTORS, PrepareConfig, resolve_paths, validate_config
from datamodules.prepare.run import prepare
from src.cli import exit_status
from src.faces import DEFAULT_DETECT_SIZE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m datamodules.prepare",
        description=preparation.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="folder, .tar / directory / pattern of shards, or CelebA root")
    p.add_argument("--format", required=True, choices=("folder", "wds", "celeba"))
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--captions", default=None, help="JSONL caption table (key/image + caption/text)")
    p.add_argument("--captioner", default=None, help="local dir of a transformers image-to-text model")
    p.add_argument("--captioner-prompt", default="a photography of", help="prefix the captioner continues")
    p.add_argument("--min-faces", type=int, default=1, help="drop images with fewer kept faces")
    p.add_argument("--max-faces", type=int, default=1, help="drop images with more kept faces")
    p.add_argument("--min-face-size", type=float, default=32.0, help="min shorter box side, pixels")
    p.add_argument("--min-prob", type=float, default=0.9, help="min MTCNN detection probability")
    p.add_argument("--clip-size", type=int, default=224, help="side of the aligned CLIP crop")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="input images per output shard")
    p.add_argument("--resolution-max", type=int, default=1024, help="downscale so the longer side <= this")
    p.add_argument("--pad-retry", type=float, default=1.25, help="pad factor for a retry when no face (<=1: off)")
    p.add_argument(
        "--landmark-fallback", action=argparse.BooleanOptionalAction, default=True,
        help="celeba: use list_landmarks_align_celeba.txt when MTCNN finds no face",
    )
    p.add_argument("--shuffle", action="store_true", help="folder/celeba: seeded shuffle of the input order")
    p.add_argument("--seed", type=int, default=0, help="seed for --shuffle and torch")
    p.add_argument("--detect-size", type=int, default=DEFAULT_DETECT_SIZE,
                   help="detect faces on a copy with the longer side <= this (boxes mapped back); 0: full resolution")
    p.add_argument("--detect-batch", type=int, default=8,
                   help="inputs decoded and detected together (equal-size detection copies share an MTCNN batch)")
    p.add_argument("--detect-channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="MTCNN's networks on channels-last inputs (faster on the CPU; detections equal up to float "
                        "rounding); --no-detect-channels-last: facenet-pytorch's detect_face exactly as shipped")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, one shard per task, one torch thread each; 1: this process (same shards)")
    p.add_argument("--device", default="cpu", help="torch device for MTCNN and the captioner (e.g. cuda)")
    p.add_argument("--distributor", default="local", choices=DISTRIBUTORS,
                   help="local: this process or --workers processes; ray: one Ray task per shard, on a local "
                        "Ray instance with --workers CPUs or the cluster at --ray-address (same shards)")
    p.add_argument("--ray-address", default=None,
                   help="with --distributor ray: the cluster to use, 'auto' or HOST:PORT (default: start a local one)")
    return p


def parse_config(argv: list[str] | None = None) -> PrepareConfig:
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(**vars(args))
    resolve_paths(cfg)
    validate_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the manifest."""
    return prepare(parse_config(argv))


def console() -> None:
    """Console script `uniportrait-prepare`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
