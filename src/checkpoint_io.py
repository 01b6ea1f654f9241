"""Crash-safe, load-safe checkpoint files for Lightning: `AtomicCheckpointIO`.

Saving: the checkpoint is serialised into a temporary file in the target's directory, flushed and
fsync'ed, then `os.replace`d over the target (atomic on POSIX filesystems) and the directory is fsync'ed.
A process killed at any moment of a save therefore leaves either the previous checkpoint or the new one
under the target name, never a truncated file (at worst a stray ``.<name>.<random>.tmp``, removed by the
next successful save of that name).

Loading: always `torch.load(..., weights_only=True)`: a checkpoint whose pickle would build arbitrary
objects (and so could run code) is refused with an error naming the file, whatever the caller or the
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable asks for.

Use it with ``trainer.plugins: [{class_path: src.checkpoint_io.AtomicCheckpointIO}]``.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from src.paths import is_local

log = logging.getLogger(__name__)


def _fsync_dir(directory: Path) -> None:
    """Persist the directory entry of a rename (no-op where directories cannot be opened, e.g. Windows)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_weights_only(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`; an unsafe or unreadable pickle raises ValueError naming `path`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing to load checkpoint '{path}': it holds objects that a weights-only load does not allow "
            f"(only tensors and plain containers/numbers/strings are accepted): {str(e).splitlines()[0]}"
        ) from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic (temp file + fsync + os.replace) and loads weights-only.

    Remote paths (``s3://`` etc.) fall back to Lightning's own save, which is not atomic on every store.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        if not is_local(path):
            return super().save_checkpoint(checkpoint, path)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by an earlier save that was killed
            with suppress(FileNotFoundError):
                stale.unlink()

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """Serialise `checkpoint` into the open temporary file (overridable, e.g. to simulate a crash)."""
        torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: str | Path, map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"{type(self).__name__} loads checkpoints with weights_only=True only "
                             f"(asked for weights_only=False for '{path}')")
        if not is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        path = Path(str(path).removeprefix("file://"))
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: '{path}'")
        return load_weights_only(path, map_location)
