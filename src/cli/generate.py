"""Generate identity-preserving images from the command line.

Examples:
  # two people, released UniPortrait weights on a local SD1.5 (components YAML = configs' model.components)
  python -m src.generate --prompt "two friends having coffee in Paris" \\
      --face alice.jpg --face bob.jpg --components configs/stage1.yaml \\
      --released-faceid uniportrait-faceid_sd15.bin --released-router uniportrait-router_sd15.bin --out out/
  # the embedded default (after `make demo`): tiny components under artifacts/tiny, newest runs/tiny checkpoint
  python -m src.generate --prompt "a person" --face-crop artifacts/tiny/examples/person_a.png --out out/
  # SDXL: an SDXL base model (text_encoder_2/, tokenizer_2/) with a checkpoint trained on it or its export
  python -m src.generate --prompt "a person" --face alice.jpg --components configs/sdxl/stage2.yaml \\
      --checkpoint runs/sdxl/stage2/checkpoints/last.ckpt --out out/

The architecture (SD1.5 or SDXL) is the base model's; weights made for the other one are an error.

Each --face / --face-crop is one identity, in order; several comma-separated files in one option
are several references of that identity. A photo without a detectable face is an error naming it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from src.cli import exit_status, run_or_exit
from src.cli.weights import add_weight_options, load_weights
from src.inference.io import read_identities, read_masks, save_outputs
from src.inference.pipeline import SCHEDULERS

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    p.add_argument("--face", dest="identities", action="append", default=[], type=lambda s: ("photo", s),
                   metavar="PHOTO[,PHOTO...]",
                   help="one identity from photos (MTCNN detection, largest face, aligned crops); repeat per person")
    p.add_argument("--face-crop", dest="identities", action="append", type=lambda s: ("crop", s),
                   metavar="CROP[,CROP...]",
                   help="one identity from already aligned face crops (ArcFace-template alignment, any square "
                        "size; no detection); repeat per person")
    p.add_argument("--out", type=Path, required=True, help="output folder for the PNGs")
    add_weight_options(p)
    p.add_argument("--face-scale", type=float, default=0.7, help="face-ID attention scale (default 0.7)")
    p.add_argument("--structure-scale", type=float, default=None,
                   help="face structure scale beta (default 0.1 for one identity, 0.3 for several)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS), help="sampler (default ddim)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the UNet's native size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the UNet's native size)")
    p.add_argument("--mask", action="append", type=Path, default=[],
                   help="explicit mask image per identity (white = this identity), in identity order; replaces "
                        "the router")
    p.add_argument("--routing-maps", action="store_true", help="also save the routing maps as PNGs")
    return p


def run(args: argparse.Namespace) -> list[Path]:
    """Read the inputs (before any weights load), generate, write the PNGs; returns the written paths."""
    if not args.identities:
        raise ValueError("give at least one --face or --face-crop")
    identities = read_identities(args.identities)
    masks = read_masks(args.mask, len(identities))
    pipe = load_weights(args).pipeline
    out = pipe(
        args.prompt, identities, negative_prompt=args.negative_prompt, faceid_scale=args.face_scale,
        structure_scale=args.structure_scale, guidance_scale=args.guidance, num_inference_steps=args.steps,
        scheduler=args.scheduler, seed=args.seed, num_images=args.num_images, masks=masks, height=args.height,
        width=args.width, return_routing_maps=args.routing_maps, progress=True,
    )
    if args.routing_maps and not out.routing_maps:
        log.warning("--routing-maps: nothing was routed (no router in these weights, or --face-scale 0), so no "
                    "routing map is written")
    return save_outputs(out, args.out)


def main(argv: list[str] | None = None) -> None:
    written = run_or_exit(run, build_parser().parse_args(argv))
    for path in written:
        print(path)


def console() -> None:
    """Console script `uniportrait-generate`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
