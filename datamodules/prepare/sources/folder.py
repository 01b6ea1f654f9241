"""``--format folder``: a directory of images, searched recursively; a first-level sub-folder names the identity
and a sidecar ``<stem>.txt`` is an image's source text."""
from __future__ import annotations

from functools import partial
from pathlib import Path, PurePosixPath

from datamodules.prepare.config import PrepareError
from datamodules.prepare.sources import IMAGE_EXTENSIONS, SourceItem
from src.faces import load_rgb


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def list_folder(root: Path) -> list[SourceItem]:
    """Images under root, sorted by relative path; identity = first-level sub-folder name."""
    if not root.is_dir():
        raise PrepareError(f"{root}: --format folder needs a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    items = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        parts = PurePosixPath(rel).parts
        items.append(
            SourceItem(
                key=rel,
                read=partial(load_rgb, p),  # picklable: items travel to worker processes
                identity=parts[0] if len(parts) > 1 else None,
                text=_read_text(p.with_suffix(".txt")),
                caption_keys=(rel,),
            )
        )
    return items
