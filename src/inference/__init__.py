"""Inference: generating images with trained or released UniPortrait weights (`python -m src.generate`,
options: src/cli/generate.py).

pipeline.py  UniPortraitPipeline on diffusers' StableDiffusion(XL)Pipeline (or ControlNet), Identity, schedulers
arch.py      what differs between SD1.5 and SDXL: diffusers pipeline, exported file names / metadata, mismatch checks
io.py        a generation's files: identities and masks read from disk, outputs written as PNGs
loading.py   load_components, default_checkpoint, load_pipeline, export_checkpoint (weights -> pipeline, and back)
convert.py   the released UniPortrait weights <-> this project's modules (both directions, lossless)
"""
