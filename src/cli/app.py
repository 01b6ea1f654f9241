"""Serve the web demo: a gradio page generating one or several people from uploaded photos.

Examples:
  # the embedded default (after `make demo`): the tiny world under artifacts/tiny, newest runs/tiny checkpoint
  python -m src.app                       # then open http://127.0.0.1:7860
  # released UniPortrait weights on a local SD1.5 (the same weight options as `python -m src.generate`)
  python -m src.app --components configs/stage1.yaml --released-faceid uniportrait-faceid_sd15.bin \\
      --released-router uniportrait-router_sd15.bin --fp16

The model loads once, before the page is served; requests queue one at a time. Nothing is fetched from the
network (no analytics, no share link).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from src.cli import exit_status, run_or_exit
from src.inference.loading import DEFAULT_RUNS, DEFAULT_TINY, LoadedPipeline, load_pipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.app", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--uploads", choices=("photos", "crops"), default=None,
                   help="what uploads are by default (changeable in the page): photos (the largest face is found) "
                        "or aligned face crops; default crops on a synthetic world, photos otherwise")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint trained here (.ckpt or exported .safetensors); default: the newest "
                        f"last.ckpt under {DEFAULT_RUNS} when no released weights are given")
    p.add_argument("--released-faceid", type=Path, default=None, help="released uniportrait-faceid_sd15.bin")
    p.add_argument("--released-router", type=Path, default=None,
                   help="released uniportrait-router_sd15.bin (needed for several people)")
    p.add_argument("--dim-head", type=int, default=64, help="Q-Former head width of released weights (default 64)")
    p.add_argument("--components", type=Path, default=None,
                   help="YAML with the ComponentPaths keys (or a config with model.components); default: the "
                        f"embedded tiny world under {DEFAULT_TINY}")
    p.add_argument("--base-model", default=None, help="diffusers SD1.5 directory overriding components.base_model")
    p.add_argument("--fuse-lora", action="store_true", help="merge the active LoRA into the UNet weights (faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    return p


def load(args: argparse.Namespace) -> LoadedPipeline:
    """The pipeline of the weight options (as `python -m src.generate` loads it)."""
    loaded = load_pipeline(components=args.components, base_model=args.base_model, checkpoint=args.checkpoint,
                           released_faceid=args.released_faceid, released_router=args.released_router,
                           dim_head=args.dim_head, device=args.device,
                           dtype=torch.float16 if args.fp16 else None)
    if args.fuse_lora:
        loaded.pipeline.fuse_lora(True)
    return loaded


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    loaded = run_or_exit(load, args)
    from src.web.ui import serve  # gradio is imported only once the weights loaded

    serve(loaded, args.device, host=args.host, port=args.port, upload_kind=args.uploads)


def console() -> None:
    """Console script `uniportrait-app`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
