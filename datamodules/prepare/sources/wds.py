"""``--format wds``: img2dataset-style WebDataset shards (a .tar file, a directory of them, or a glob / brace
pattern), streamed member by member."""
from __future__ import annotations

import glob
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from datamodules.prepare.config import PrepareError
from datamodules.prepare.sources import SourceItem
from src.faces import UnreadableImageError, decode_rgb

WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")

log = logging.getLogger(__name__)


def resolve_tars(spec: str) -> list[Path]:
    """A .tar file, a directory of .tar files, or a glob / brace pattern -> sorted tar paths."""
    import braceexpand

    path = Path(spec)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
    else:
        tars = sorted({Path(m) for pat in braceexpand.braceexpand(spec) for m in glob.glob(pat)})
    if not tars:
        raise PrepareError(f"{spec}: no .tar shards found")
    return tars


def _split_member(name: str) -> tuple[str, str]:
    """webdataset naming: "dir/key.ext.ext2" -> ("dir/key", "ext.ext2")."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


def _tar_groups(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) groups of consecutive members sharing a key."""
    try:
        with tarfile.open(tar_path, "r|*") as tf:
            key, group = None, {}
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_member(member.name)
                if key is not None and k != key:
                    yield key, group
                    group = {}
                key = k
                group[ext] = tf.extractfile(member).read()
            if key is not None:
                yield key, group
    except tarfile.TarError as e:
        raise PrepareError(f"{tar_path}: unreadable tar ({e})") from e


def _wds_text(group: dict[str, bytes]) -> str | None:
    if "txt" in group:
        text = group["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return text
    if "json" in group:
        try:
            caption = json.loads(group["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
    return None


def _wds_read(data: bytes | None, source: str) -> np.ndarray:
    if data is None:
        raise UnreadableImageError(f"{source}: sample has no image field ({', '.join(WDS_IMAGE_FIELDS)})")
    return decode_rgb(data, source)


def _wds_reader(data: bytes | None, source: str) -> Callable[[], np.ndarray]:
    """The sample's `read` (a partial, picklable: items travel to worker processes)."""
    return partial(_wds_read, data, source)


def _unreadable(message: str) -> np.ndarray:
    raise UnreadableImageError(message)


def iter_wds(spec: str) -> Iterator[SourceItem]:
    """Stream img2dataset-style samples from tar shards, in file then member order. A tar that cannot be read
    to its end (a truncated download) keeps the samples before the damage and adds one input that reads as
    unreadable, so the run counts and logs it as a dropped input and goes on."""
    for tar_path in resolve_tars(spec):
        try:
            for key, group in _tar_groups(tar_path):
                data = next((group[e] for e in WDS_IMAGE_FIELDS if e in group), None)
                source = f"{tar_path.name}/{key}"
                yield SourceItem(
                    key=source,
                    read=_wds_reader(data, f"{tar_path}:{key}"),
                    text=_wds_text(group),
                    caption_keys=(key, source),
                )
        except PrepareError as err:
            log.warning("%s: the samples after the damage are lost; the run goes on", err)
            yield SourceItem(key=f"{tar_path.name}/<unreadable tar>",
                             read=partial(_unreadable, f"{err}: the samples after the damage are lost"))
