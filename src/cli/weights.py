"""The weight options that `generate` and the web demo (`app`) share, and loading the pipeline they name.

One definition, so the two commands take the same flags with the same defaults (the web demo runs "with the
same flags as generate"). Not a command itself: no `main`, no console script.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from src.inference.loading import DEFAULT_RUNS, DEFAULT_TINY, LoadedPipeline, load_pipeline


def add_weight_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --released-faceid, --released-router, --dim-head, --components, --base-model, --fuse-lora,
    --device, --fp16."""
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint trained here (.ckpt, or its weights-only .safetensors form written by "
                        "src.inference.convert.export_checkpoint_safetensors; uniportrait-export's files go to "
                        "--released-faceid / --released-router); default: the newest "
                        f"last.ckpt under {DEFAULT_RUNS} when no released weights are given")
    p.add_argument("--released-faceid", type=Path, default=None,
                   help="released uniportrait-faceid_sd15.bin (or an exported uniportrait-faceid_sdxl.safetensors)")
    p.add_argument("--released-router", type=Path, default=None,
                   help="released uniportrait-router_sd15.bin (or uniportrait-router_sdxl.safetensors; needed for "
                        "several identities without masks)")
    p.add_argument("--dim-head", type=int, default=None,
                   help="Q-Former head width of released weights (default: the file's metadata, else 64)")
    p.add_argument("--components", type=Path, default=None,
                   help="YAML with the ComponentPaths keys (or a config with model.components); default: the "
                        f"embedded tiny world under {DEFAULT_TINY}")
    p.add_argument("--base-model", default=None,
                   help="diffusers SD1.5 or SDXL directory overriding components.base_model")
    p.add_argument("--fuse-lora", action="store_true", help="merge the active LoRA into the UNet weights (faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU)")


def load_weights(args: argparse.Namespace) -> LoadedPipeline:
    """The pipeline the options of `add_weight_options` name, its LoRA merged with --fuse-lora."""
    if args.fp16 and str(args.device).startswith("cpu"):
        logging.getLogger(__name__).warning("--fp16 on --device cpu: half precision is for GPUs and runs slowly "
                                            "on the CPU, if at all (drop --fp16)")
    loaded = load_pipeline(components=args.components, base_model=args.base_model, checkpoint=args.checkpoint,
                           released_faceid=args.released_faceid, released_router=args.released_router,
                           dim_head=args.dim_head, device=args.device,
                           dtype=torch.float16 if args.fp16 else None)
    if args.fuse_lora:
        loaded.pipeline.fuse_lora(True)
    return loaded
