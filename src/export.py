"""Export a checkpoint trained here to the released UniPortrait layout, so it runs wherever the
authors' weights run:

    python -m src.export --checkpoint runs/stage2/checkpoints/last.ckpt --components weights.yaml --out released/

writes `uniportrait-faceid_sd15.bin` (ID embedding, face-ID projections, single-ID LoRA) and, for a
stage-2 checkpoint, `uniportrait-router_sd15.bin` (routers, multi-ID LoRA), as plain tensor dicts
(`--safetensors` writes the flattened `.safetensors` form instead). The base model is needed for the
UNet's processor order, which fixes the released keys. Loading the files back
(`UniPortraitPipeline.from_released`) gives bit-identical weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src import convert
from src.models import adapters

FACEID_NAME, ROUTER_NAME = "uniportrait-faceid_sd15", "uniportrait-router_sd15"


def export(checkpoint: Path, components_yaml: Path | None, out: Path, base_model: str | None = None,
           safetensors: bool = False) -> list[Path]:
    """Write the released-layout files of `checkpoint` under `out`; returns their paths."""
    from src.generate import load_components
    from src.pipeline import UniPortraitPipeline

    pipe = UniPortraitPipeline.from_checkpoint(load_components(components_yaml, base_model), checkpoint)
    suffix = ".safetensors" if safetensors else ".bin"
    faceid = out / f"{FACEID_NAME}{suffix}"
    unet = pipe.pipe.unet
    router = out / f"{ROUTER_NAME}{suffix}" if adapters.router_parameters(unet) else None  # a stage-2 checkpoint
    convert.export_released(unet, pipe.identity.embedding, faceid, router)
    return [faceid] + ([router] if router is not None else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="our .ckpt (or its .safetensors export)")
    p.add_argument("--components", type=Path, default=None,
                   help="YAML with model.components (base model etc.); default: the embedded tiny default")
    p.add_argument("--base-model", default=None, help="override components.base_model (diffusers directory)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--safetensors", action="store_true", help="write .safetensors instead of torch .bin files")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    from src.generate import run_or_exit

    args = build_parser().parse_args(argv)
    written = run_or_exit(lambda a: export(a.checkpoint, a.components, a.out, a.base_model, a.safetensors), args)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
