"""Input sources of the preparation, one module per ``--format``: `folder`, `wds`, `celeba`.

Each lists or streams `SourceItem`s (one input image, not yet decoded) in a deterministic order;
`enumerate_inputs` picks the source of a config. A new input format is a new module here plus its
branch in `enumerate_inputs`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.prepare.config import PrepareConfig, PrepareError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class SourceItem:
    """One input image, not yet decoded.

    key: source key (relative posix path for folder/celeba, "<tar name>/<__key__>" for wds).
    read: returns the uint8 (H, W, 3) image, raises UnreadableImageError naming the source.
    landmarks: optional (5, 2) annotated landmarks in source pixels (CelebA fallback).
    """

    key: str
    read: Callable[[], np.ndarray]
    identity: str | None = None
    text: str | None = None
    caption_keys: tuple[str, ...] = ()
    landmarks: np.ndarray | None = None


def enumerate_inputs(cfg: PrepareConfig) -> tuple[int | None, Iterable[SourceItem]]:
    """(total or None when streamed, items in their deterministic order)."""
    # the sources import SourceItem from this module: imported here, when one is used
    from datamodules.prepare.sources.celeba import list_celeba
    from datamodules.prepare.sources.folder import list_folder
    from datamodules.prepare.sources.wds import iter_wds

    root = Path(cfg.input)
    if cfg.format == "wds":
        return None, iter_wds(cfg.input)
    items = list_folder(root) if cfg.format == "folder" else list_celeba(root)
    if not items:
        raise PrepareError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(items))
        items = [items[i] for i in order]
    return len(items), items
