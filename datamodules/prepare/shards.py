"""Output of the preparation: shards written through a temporary name, the manifest (settings, per-shard and
total counts), and the checks that make a re-run resume safely."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from datamodules.prepare.config import LEGACY_SETTINGS, PrepareConfig, PrepareError
from datamodules.prepare.image import REASONS, Outcome
from datamodules.schema import encode_sample
from src.paths import changed_settings

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"


def new_manifest(cfg: PrepareConfig) -> dict:
    return {"settings": cfg.content_settings(), "shards": {}, "completed_shards": [], "finished": False}


def load_manifest(out: Path, cfg: PrepareConfig) -> dict:
    """The existing manifest (checked against cfg) or a new one."""
    path = out / MANIFEST
    if not path.is_file():
        return new_manifest(cfg)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PrepareError(f"{path}: unreadable manifest ({e}); remove it to start over") from e
    old, new = {**LEGACY_SETTINGS, **manifest.get("settings", {})}, cfg.content_settings()
    diffs = changed_settings(old, new, sorted(set(old) | set(new)))
    if diffs:
        raise PrepareError(f"{path}: settings differ from the run that made this directory ({diffs}); use a new --out")
    return manifest


def summarise(manifest: dict) -> None:
    """Recompute the totals from the per-shard entries (in place)."""
    shards = manifest["shards"]
    dropped: Counter = Counter()
    for s in shards.values():
        dropped.update(s["dropped"])
    manifest["completed_shards"] = sorted(shards)
    manifest["inputs"] = sum(s["inputs"] for s in shards.values())
    manifest["kept"] = sum(s["kept"] for s in shards.values())
    manifest["landmark_fallback"] = sum(s["landmark_fallback"] for s in shards.values())
    manifest["dropped"] = {r: dropped.get(r, 0) for r in sorted(set(REASONS) | set(dropped))}


def keys_digest(keys: Iterable[str]) -> str:
    h = hashlib.sha1()
    for k in keys:
        h.update(k.encode("utf-8") + b"\0")
    return h.hexdigest()


class ShardRun:
    """Writes one shard through a temporary name; renamed only by `commit`."""

    def __init__(self, out: Path, name: str) -> None:
        self.final = out / name
        self.tmp = out / (name + ".tmp")
        # a fixed member mtime: the same inputs and settings give byte-identical shard files
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=0.0)
        self.stats = {"inputs": 0, "kept": 0, "dropped": Counter(), "landmark_fallback": 0}
        self.keys: list[str] = []

    def add(self, key: str, outcome: Outcome) -> None:
        self.keys.append(key)
        self.stats["inputs"] += 1
        if outcome.sample is None:
            self.stats["dropped"][outcome.reason] += 1
            return
        self.writer.write(encode_sample(outcome.sample))
        self.stats["kept"] += 1
        self.stats["landmark_fallback"] += int(outcome.landmark_fallback)

    def commit(self) -> dict:
        self.writer.close()
        os.replace(self.tmp, self.final)
        return {**self.stats, "dropped": dict(self.stats["dropped"]), "keys_sha1": keys_digest(self.keys)}

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def check_completed(out: Path, name: str, entry: dict, keys: list[str]) -> None:
    """A completed shard's inputs must be the same as when it was written."""
    if keys_digest(keys) != entry["keys_sha1"]:
        raise PrepareError(
            f"{out / name}: its inputs changed since it was written ({len(keys)} inputs now, "
            f"{entry['inputs']} then); use a new --out"
        )
