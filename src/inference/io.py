"""A generation's files: its inputs read from disk (identities from photos or aligned crops, explicit
masks), checked before any weights load, and its outputs written as PNGs (images, routing maps in
identity colours). Used by `python -m src.generate` (src/cli/generate.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.conventions import IDENTITY_COLOURS
from src.faces import load_rgb, same_size_crops
from src.inference.pipeline import Identity, PipelineOutput

# identity colours of the routing-map PNGs (identity n -> PALETTE[n % 16]); black = no identity
PALETTE = np.array(IDENTITY_COLOURS, dtype=np.uint8)  # (16, 3)


def routing_colours(hard: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hard routing (N, h, w) -> identity colours uint8 (h, w, 3) and the positions any identity claims (h, w)."""
    colour = PALETTE[hard.argmax(0).numpy() % len(PALETTE)]  # (h, w, 3)
    return colour, (hard.sum(0) > 0).numpy()


def read_identities(specs: list[tuple[str, str]]) -> list[Identity]:
    """Identities from `--face` photos and `--face-crop` crops. Every file is read here, before any
    weights load, so a missing or non-image file fails at once (UnreadableImageError naming it);
    face detection on the photos runs later, inside the pipeline."""
    identities = []
    for kind, value in specs:
        files = [Path(v) for v in value.split(",") if v]
        if not files:
            raise ValueError(f"--{'face' if kind == 'photo' else 'face-crop'} {value!r}: no file named")
        images = [load_rgb(f) for f in files]
        if kind == "photo":
            identities.append(Identity(references=files))
        else:  # square, one size per person
            identities.append(Identity.from_crops(same_size_crops([np.array(img) for img in images],
                                                                  [str(f) for f in files])))
    return identities


def read_masks(paths: list[Path], num_ids: int) -> np.ndarray | None:
    """Explicit mask images, one per identity (white = this identity) -> (N, H, W) float32 in {0, 1}, or None."""
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
            colour, claimed = routing_colours(m.hard[i])  # (h, w, 3), (h, w)
            colour[~claimed] = 0
            path = out_dir / "routing" / f"{m.name.replace('.', '_')}_img{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(colour).resize(size, Image.NEAREST).save(path)
            written.append(path)
    return written
