"""`uniportrait-tiny-sdxl` / `python -m src.cli.tiny_sdxl`: the tiny SDXL world (src/tiny/sdxl.py), written from a
built SD1.5 tiny world (`make tiny`); its UNet copied from the shipped assets/tiny-sdxl or pretrained here."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from src.cli import exit_status, run_or_exit
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
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the UNet here (~6 min on 2 cores) instead of copying the shipped weights of --assets")
    p.add_argument("--assets", type=Path, default=SDXL_ASSETS,
                   help="shipped pretrained UNet, used when its manifest.json was made with these options "
                        "(default: %(default)s)")
    p.add_argument("--save-assets", type=Path, default=None, metavar="DIR",
                   help="after building with --pretrain, write the pretrained UNet and its manifest to DIR "
                        "(what `make tiny-sdxl-assets` does for assets/tiny-sdxl)")
    args = p.parse_args(argv)
    if args.save_assets and not args.pretrain:
        p.error("--save-assets needs --pretrain (only weights pretrained here can be shipped)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    def build(a: argparse.Namespace) -> Path:
        return build_sdxl(a.out, a.sd15_world, seed=a.seed, unet_steps=a.unet_steps,
                          pretrain_images=a.pretrain_images, pretrain=a.pretrain, assets=a.assets)

    out = run_or_exit(build, args)
    if args.save_assets:
        command = "python -m src.cli.tiny_sdxl " + " ".join(argv if argv is not None else sys.argv[1:])
        save_assets(out, args.save_assets, command, files=SDXL_PRETRAINED_FILES, companions=SDXL_COMPANIONS,
                    figures=("unet_loss",))
    print(f"tiny SDXL world at {out} ({tiny_components(out).arch})")
    return out


def console() -> None:
    """Console script `uniportrait-tiny-sdxl`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
