"""`uniportrait-tiny` / `python -m src.tiny`: build the embedded default's world (src/tiny/)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

import src.tiny as tiny
from src.cli import add_shipped_weight_options, exit_status, shipped_weight_command
from src.tiny.assets import ASSETS, save_assets
from src.tiny.world import build, measure_quality


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=tiny.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("artifacts/tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--unet-steps", type=int, default=400)
    p.add_argument("--face-steps", type=int, default=120)
    p.add_argument("--face-pooled-weight", type=float, default=0.0,
                   help="weight of a second face-backbone margin loss on the spatial mean of its last map "
                        "(0: off, the default; see src.tiny.face_pretrain.pooled_features)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes rendering the synthetic images (default: one per core; the same bytes)")
    p.add_argument("--quality", action="store_true",
                   help="build nothing: print the held-out quality of the world at --out (measure_quality)")
    add_shipped_weight_options(p, ASSETS, "the UNet, VAE and face backbone (~13 min on 2 cores)", "tiny-assets")
    a = p.parse_args(argv)
    command = shipped_weight_command(p, a, argv, "src.tiny")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quality:
        print(json.dumps(measure_quality(a.out), indent=2))
        return
    report = build(a.out, seed=a.seed, vae_steps=a.vae_steps, unet_steps=a.unet_steps, face_steps=a.face_steps,
                   face_pooled_weight=a.face_pooled_weight, workers=a.workers, pretrain=a.pretrain,
                   assets=a.assets)
    print(json.dumps(report, indent=2, default=str))
    if a.save_assets:
        save_assets(a.out, a.save_assets, command)


def console() -> None:
    """Console script `uniportrait-tiny`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
