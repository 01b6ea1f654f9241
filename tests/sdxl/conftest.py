"""The tiny SDXL world on the fixture SD1.5 world (tests/conftest.py), once per test session: built by the
same code as `make tiny-sdxl`, with 2 UNet pretraining steps."""
from __future__ import annotations

from pathlib import Path

import pytest

from src.tiny.sdxl import build_sdxl

SDXL_BUILD = dict(seed=0, unet_steps=2, pretrain_images=64)


@pytest.fixture(scope="session")
def sdxl_world(tiny_world, tmp_path_factory) -> Path:
    return build_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), sd15_world=tiny_world, **SDXL_BUILD)
