"""Generate identity-preserving images from the command line.

Examples:
  # two people, released UniPortrait weights on a local SD1.5 (components YAML = configs' model.components)
  python -m src.generate --prompt "two friends having coffee in Paris" \\
      --face alice.jpg --face bob.jpg --components configs/stage1.yaml \\
      --released-faceid uniportrait-faceid_sd15.bin --released-router uniportrait-router_sd15.bin --out out/
  # the embedded default (after `make demo`): tiny components under artifacts/tiny, newest runs/tiny checkpoint
  python -m src.generate --prompt "a person" --face-crop artifacts/some_crop.png --out out/

Each --face / --face-crop is one identity, in order; several comma-separated files in one option
are several references of that identity. A photo without a detectable face is an error naming it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from src.faces import NoFaceError, UnreadableImageError, load_rgb
from src.models.presets import ComponentPaths
from src.pipeline import SCHEDULERS, Identity, PipelineOutput, UniPortraitPipeline

log = logging.getLogger("src.generate")

DEFAULT_TINY = Path("artifacts/tiny")
DEFAULT_RUNS = Path("runs/tiny")
# identity colours of the routing-map PNGs (identity n -> PALETTE[n % len]); black = no identity
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240]],
                   dtype=np.uint8)


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
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint trained here (.ckpt or exported .safetensors); default: the newest "
                        f"last.ckpt under {DEFAULT_RUNS} when no released weights are given")
    p.add_argument("--released-faceid", type=Path, default=None, help="released uniportrait-faceid_sd15.bin")
    p.add_argument("--released-router", type=Path, default=None,
                   help="released uniportrait-router_sd15.bin (needed for several identities without masks)")
    p.add_argument("--dim-head", type=int, default=64, help="Q-Former head width of released weights (default 64)")
    p.add_argument("--components", type=Path, default=None,
                   help="YAML with the ComponentPaths keys (or a config with model.components); default: the "
                        f"embedded tiny world under {DEFAULT_TINY}")
    p.add_argument("--base-model", default=None, help="diffusers SD1.5 directory overriding components.base_model")
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
    p.add_argument("--fuse-lora", action="store_true", help="merge the active LoRA into the UNet weights (faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    return p


def load_components(path: Path | None, base_model: str | None) -> ComponentPaths:
    """ComponentPaths from a YAML (plain keys, a `components:` section or a full config's model.components)."""
    if path is None:
        from src.tiny import tiny_components

        comps = tiny_components(DEFAULT_TINY)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"--components: no such file {path}")
        data: Any = yaml.safe_load(path.read_text()) or {}
        if isinstance(data.get("model"), dict):
            data = data["model"]
        if isinstance(data.get("init_args"), dict):
            data = data["init_args"]
        data = data.get("components", data)
        if isinstance(data.get("init_args"), dict):
            data = data["init_args"]
        try:
            comps = ComponentPaths(**data)
        except TypeError as err:
            raise ValueError(f"{path}: not a ComponentPaths section ({err})") from err
    if base_model is not None:
        comps.base_model = base_model
    return comps


def default_checkpoint(runs: Path = DEFAULT_RUNS) -> Path:
    """The newest last.ckpt of the embedded default's training (`make demo`)."""
    found = sorted(runs.glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint given and none under {runs}: run `make demo`, or pass --checkpoint / --released-faceid"
        )
    return found[-1]


def read_identities(specs: list[tuple[str, str]]) -> list[Identity]:
    """Identities from `--face` photos and `--face-crop` crops. Every file is read here, before any
    weights load, so a missing or non-image file fails at once (UnreadableImageError naming it);
    face detection on the photos runs later, inside the pipeline."""
    identities = []
    for kind, value in specs:
        files = [Path(v) for v in value.split(",") if v]
        images = [load_rgb(f) for f in files]
        if kind == "photo":
            identities.append(Identity(references=files))
        else:
            identities.append(Identity.from_crops([np.array(img) for img in images]))
    return identities


def read_masks(paths: list[Path], num_ids: int) -> np.ndarray | None:
    if not paths:
        return None
    if len(paths) != num_ids:
        raise ValueError(f"--mask given {len(paths)} times for {num_ids} identities (one per identity)")
    masks = [np.asarray(Image.fromarray(load_rgb(p)).convert("L"), dtype=np.float32) / 255.0 for p in paths]
    if len({m.shape for m in masks}) != 1:
        raise ValueError(f"--mask images differ in size: {[m.shape for m in masks]}")
    return (np.stack(masks) > 0.5).astype(np.float32)  # (N, H, W)


def save_outputs(out: PipelineOutput, out_dir: Path) -> list[Path]:
    """Images as image_XX.png; routing maps as routing/<layer>_imgXX.png (identity colours)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(out.images):
        path = out_dir / f"image_{i:02d}.png"
        img.save(path)
        written.append(path)
    size = out.images[0].size
    for m in out.routing_maps or []:
        for i in range(m.hard.shape[0]):
            hard = m.hard[i]  # (N, h, w)
            colour = PALETTE[hard.argmax(0).numpy() % len(PALETTE)]  # (h, w, 3)
            colour[hard.sum(0).numpy() <= 0] = 0
            path = out_dir / "routing" / f"{m.name.replace('.', '_')}_img{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colour).resize(size, Image.NEAREST).save(path)
            written.append(path)
    return written


def build_pipeline(args: argparse.Namespace) -> UniPortraitPipeline:
    comps = load_components(args.components, args.base_model)
    if args.released_faceid is not None:
        if args.checkpoint is not None:
            raise ValueError("give either --checkpoint or --released-faceid, not both")
        return UniPortraitPipeline.from_released(comps, args.released_faceid, args.released_router,
                                                 dim_head=args.dim_head)
    if args.released_router is not None:
        raise ValueError("--released-router needs --released-faceid")
    return UniPortraitPipeline.from_checkpoint(comps, args.checkpoint or default_checkpoint())


def run(args: argparse.Namespace) -> list[Path]:
    if not args.identities:
        raise ValueError("give at least one --face or --face-crop")
    identities = read_identities(args.identities)
    masks = read_masks(args.mask, len(identities))
    pipe = build_pipeline(args).to(args.device, torch.float16 if args.fp16 else None)
    if args.fuse_lora:
        pipe.fuse_lora(True)
    out = pipe(
        args.prompt, identities, negative_prompt=args.negative_prompt, faceid_scale=args.face_scale,
        structure_scale=args.structure_scale, guidance_scale=args.guidance, num_inference_steps=args.steps,
        scheduler=args.scheduler, seed=args.seed, num_images=args.num_images, masks=masks, height=args.height,
        width=args.width, return_routing_maps=args.routing_maps, progress=True,
    )
    return save_outputs(out, args.out)


def run_or_exit(run_fn, args: argparse.Namespace):
    """Run a CLI's `run(args)`; a user error (bad photo, missing file, wrong key or value) becomes
    `error: ...` on stderr and exit code 2 instead of a traceback. Shared by generate and evaluate."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_fn(args)
    except (NoFaceError, UnreadableImageError, FileNotFoundError, KeyError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from err


def main(argv: list[str] | None = None) -> None:
    written = run_or_exit(run, build_parser().parse_args(argv))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
