"""Telling a local filesystem path from a URL: shared by the shard loader and the checkpoint I/O."""
from __future__ import annotations

import os
import re

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http:, s3:, gs: ... (not a local path)


def is_local(url: str | os.PathLike[str]) -> bool:
    """True for a plain filesystem path (no `scheme:` prefix, or `file:`)."""
    url = os.fspath(url)
    return url.startswith("file:") or not _SCHEME.match(url) or os.path.exists(url)
