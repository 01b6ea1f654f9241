"""``--format celeba``: the CelebA layout (``img_align_celeba/``, ``identity_CelebA.txt``, optionally
``list_landmarks_align_celeba.txt``, whose landmarks are the fallback when MTCNN finds no face)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from datamodules.prepare.config import PrepareError
from datamodules.prepare.sources import IMAGE_EXTENSIONS, SourceItem
from src.faces import load_rgb


def _celeba_table(path: Path, n_values: int, header_lines: int) -> dict[str, list[str]]:
    """CelebA annotation file -> {file name: values}. Errors name file and line."""
    table: dict[str, list[str]] = {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if lineno <= header_lines or not fields:
                continue
            if len(fields) != n_values + 1:
                raise PrepareError(f"{path}:{lineno}: expected {n_values + 1} fields, got {len(fields)}")
            table[fields[0]] = fields[1:]
    return table


def list_celeba(root: Path) -> list[SourceItem]:
    """CelebA layout -> items with identity labels and (optional) annotated landmarks."""
    img_dir = root / "img_align_celeba"
    if not img_dir.is_dir():
        raise PrepareError(f"{img_dir}: missing; --format celeba expects <root>/img_align_celeba/")
    ids_path = root / "identity_CelebA.txt"
    identities = _celeba_table(ids_path, 1, 0) if ids_path.is_file() else {}
    lm_path = root / "list_landmarks_align_celeba.txt"
    landmarks = _celeba_table(lm_path, 10, 2) if lm_path.is_file() else {}
    items = []
    for p in sorted(q for q in img_dir.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS):
        lm = landmarks.get(p.name)
        try:
            lm_arr = np.asarray(lm, dtype=np.float32).reshape(5, 2) if lm else None
        except ValueError as e:
            raise PrepareError(f"{lm_path}: non-numeric landmarks for {p.name}") from e
        ident = identities.get(p.name)
        items.append(
            SourceItem(
                key=p.name,
                read=partial(load_rgb, p),  # picklable: items travel to worker processes
                identity=ident[0] if ident else None,
                caption_keys=(p.name, f"img_align_celeba/{p.name}"),
                landmarks=lm_arr,
            )
        )
    return items
