"""Local files: telling a filesystem path from a URL (shared by the shard loader and the checkpoint I/O), and
a resumable output directory's JSON manifest (shard preparation, the latent cache): written atomically, its
settings compared with a re-run's."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http:, s3:, gs: ... (not a local path)


def is_local(url: str | os.PathLike[str]) -> bool:
    """True for a plain filesystem path (no `scheme:` prefix, or `file:`)."""
    url = os.fspath(url)
    return url.startswith("file:") or not _SCHEME.match(url) or os.path.exists(url)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` as JSON to a temporary file renamed over `path` (never a half-written manifest)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str]) -> str:
    """The `keys` whose values differ, as "key: old -> new, ..." ("" when none): what a re-run into a
    directory made with other settings is refused with."""
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))
