"""Weights for the web demo's tests: random released-layout adapters (faceid + router) over a tiny world's
components, so the tests never depend on a training run (`make test-slow` runs beside CI's training)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from src.tiny import tiny_components
from tests.inference.helpers import DIM_HEAD, tiny_embedding_for, write_released


def released_weights(world: Path, out: Path, seed: int = 2) -> list[str]:
    """Write random uniportrait-faceid/router files for the world at `world` under `out`; returns the
    weight options of `python -m src.app` / `python -m src.generate` that load them."""
    paths = tiny_components(world)
    faceid, router = write_released(out, paths.build().unet, tiny_embedding_for(paths), seed=seed)
    return ["--released-faceid", str(faceid), "--released-router", str(router), "--dim-head", str(DIM_HEAD)]


def blank_photo(path: Path, size: int = 160) -> Path:
    """A flat grey photo: no face for the detector to find."""
    Image.fromarray(np.full((size, size, 3), 127, np.uint8)).save(path)
    return path
