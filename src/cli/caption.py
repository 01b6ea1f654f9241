"""`uniportrait-caption` / `python -m src.cli.caption`: caption photos with a local Qwen2-VL / Qwen2.5-VL
model into the JSONL caption table that `uniportrait-prepare --captions` reads (datamodules/qwen_captioner.py;
its docstring is the --help text)."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

import datamodules.qwen_captioner as qwen_captioner
from datamodules.qwen_captioner import (
    DEFAULT_PROMPT,
    CaptionCounts,
    QwenCaptioner,
    caption_images,
    list_images,
    summary,
)
from src.cli import exit_status


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uniportrait-caption",
        description=qwen_captioner.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="folder of photos (recursive) or a list file of image paths")
    p.add_argument("--root", default=None, help="keys are paths relative to this (default: the folder / list's dir)")
    p.add_argument("--model", required=True, help="local directory of a Qwen2-VL / Qwen2.5-VL model + processor")
    p.add_argument("--out", required=True, help="JSONL caption table, appended to (existing keys are skipped)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="instruction sent with each image")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=77, help="generation length limit per caption")
    p.add_argument("--max-pixels", type=int, default=None, help="cap on pixels per image (default: the processor's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> CaptionCounts:
    """CLI entry point; returns the counts of the run."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    if a.batch_size < 1 or a.max_new_tokens < 1:
        raise SystemExit(f"--batch-size and --max-new-tokens must be >= 1 (got {a.batch_size}, {a.max_new_tokens})")
    items = list_images(a.input, a.root)
    captioner = QwenCaptioner(a.model, prompt=a.prompt, max_new_tokens=a.max_new_tokens, device=a.device,
                              dtype=a.dtype, max_pixels=a.max_pixels)
    counts = caption_images(captioner, items, a.out, batch_size=a.batch_size, progress=not a.no_progress)
    print(summary(counts, a.out))
    return counts


def console() -> None:
    """Console script `uniportrait-caption`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
