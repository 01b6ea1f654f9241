"""Export a checkpoint trained here to the released UniPortrait layout, so it runs wherever the
authors' weights run:

    python -m src.export --checkpoint runs/stage2/checkpoints/last.ckpt --components configs/stage2.yaml --out released/

writes `uniportrait-faceid_sd15.bin` (ID embedding, face-ID projections, single-ID LoRA) and, for a
stage-2 checkpoint, `uniportrait-router_sd15.bin` (routers, multi-ID LoRA), as plain tensor dicts
(`--safetensors` writes the flattened `.safetensors` form instead; `--dtype float16` writes half-size
files, the released files' dtype). The base model is needed for the
UNet's processor order, which fixes the released keys. Loading the files back
(`UniPortraitPipeline.from_released`) gives bit-identical weights.

On an SDXL base model (text_encoder_2/, tokenizer_2/) the files are `uniportrait-faceid_sdxl.safetensors`
(+ `uniportrait-router_sdxl.safetensors`): the same layout, always safetensors, with metadata naming the
architecture, cross_attention_dim, LoRA rank, tokens and Q-Former head width (src/inference/arch.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from src.cli import exit_status, run_or_exit
from src.inference.loading import export_checkpoint

DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}  # None: as trained


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="our .ckpt (or its weights-only .safetensors form, "
                   "src.inference.convert.export_checkpoint_safetensors)")
    p.add_argument("--components", type=Path, default=None,
                   help="YAML with model.components (base model etc.); default: the embedded tiny default")
    p.add_argument("--base-model", default=None, help="override components.base_model (diffusers directory)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--safetensors", action="store_true",
                   help="write .safetensors instead of torch .bin files (SDXL: always)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the written weights (default float32, as trained; the released files are float16)")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    written = run_or_exit(
        lambda a: export_checkpoint(a.checkpoint, a.components, a.out, a.base_model, a.safetensors,
                                    dtype=DTYPES[a.dtype]), args)
    for path in written:
        print(path)
    return written


def console() -> None:
    """Console script `uniportrait-export`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
