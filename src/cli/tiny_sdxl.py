"""`uniportrait-tiny-sdxl` / `python -m src.cli.tiny_sdxl`: the tiny SDXL world (src/tiny/sdxl.py), written from a
built SD1.5 tiny world (`make tiny`); its UNet copied from the shipped assets/tiny-sdxl or pretrained here."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from src.cli import add_shipped_weight_options, exit_status, run_or_exit, shipped_weight_command
from src.tiny.architectures import tiny_components
from src.tiny.assets import save_assets
from src.tiny.sdxl import SD15_WORLD, SDXL_ASSETS, SDXL_COMPANIONS, SDXL_PRETRAINED_FILES, build_sdxl


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m src.cli.tiny_sdxl", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("artifacts/tiny-sdxl"), help="the world's folder")
    p.add_argument("--sd15-world", type=Path, default=SD15_WORLD, help="a built SD1.5 tiny world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unet-steps", type=int, default=400, help="UNet pretraining steps (batch 32)")
    p.add_argument("--pretrain-images", type=int, default=2000, help="single-face training renders it pretrains on")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_shipped_weight_options(p, SDXL_ASSETS, "the UNet (~7 min on 2 cores)", "tiny-sdxl-assets")
    args = p.parse_args(argv)
    command = shipped_weight_command(p, args, argv, "src.cli.tiny_sdxl")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    def build(a: argparse.Namespace) -> Path:
        return build_sdxl(a.out, a.sd15_world, seed=a.seed, unet_steps=a.unet_steps,
                          pretrain_images=a.pretrain_images, pretrain=a.pretrain, assets=a.assets)

    out = run_or_exit(build, args)
    if args.save_assets:
        save_assets(out, args.save_assets, command, files=SDXL_PRETRAINED_FILES, companions=SDXL_COMPANIONS,
                    figures=("unet_loss",))
    print(f"tiny SDXL world at {out} ({tiny_components(out).arch})")
    return out


def console() -> None:
    """Console script `uniportrait-tiny-sdxl`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
