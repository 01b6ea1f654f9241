"""datamodules.prepare --distributor ray on a local Ray instance (2 CPUs): the same shards and manifest as one
process, counted drops, resume after a kill, and a shard task that raises retried by Ray."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

import datamodules.prepare.run as prepare_run
from datamodules.prepare.config import PrepareConfig
from datamodules.prepare.distributed import MAX_RETRIES, connect
from src.cli.prepare import main as prep_main
from tests.data.test_prepare_parallel import assert_resumed, kill_during_shard_1, photo_folder, shard_bytes

SETTINGS = ["--format", "folder", "--samples-per-shard", "3", "--detect-size", "256", "--detect-batch", "2"]
RAY = ["--distributor", "ray", "--workers", "2"]


def ray_processes() -> list[str]:
    """Names of this process's descendants that belong to a Ray instance."""
    names = []
    for p in psutil.Process().children(recursive=True):
        try:
            names.append(p.name())
        except psutil.NoSuchProcess:
            continue
    return [n for n in names if "ray" in n.lower() or "gcs_server" in n]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The parallel test's photos prepared by one process (3 shards of 3, 3 and 1 inputs)."""
    root = tmp_path_factory.mktemp("ray")
    expected = photo_folder(root / "photos")
    out = root / "single"
    manifest = prep_main(["--input", str(root / "photos"), "--out", str(out), *SETTINGS])
    return root / "photos", out, manifest, expected


@pytest.fixture(scope="module")
def ray_run(reference, tmp_path_factory):
    """The same photos with --distributor ray: prepare starts its own local instance and shuts it down."""
    assert not ray.is_initialized()
    out = tmp_path_factory.mktemp("ray_run") / "out"
    return out, prep_main(["--input", str(reference[0]), "--out", str(out), *SETTINGS, *RAY])


@pytest.fixture(scope="module")
def ray_instance(ray_run):
    """A local instance the later tests share (prepare uses one already started); started after `ray_run`,
    which must find none, and shut down at the end of the module."""
    assert connect(None, 2)
    yield
    ray.shutdown()
    assert not ray.is_initialized()


def failing_read(read: Callable[[], np.ndarray], attempts: Path, failures: int) -> Callable[[], np.ndarray]:
    """`read`, failing its first `failures` calls; every call appends a line to `attempts` (a closure, so that
    Ray's pickling sends it by value to its workers, which cannot import this test module)."""

    def read_or_fail() -> np.ndarray:
        with attempts.open("a") as f:
            f.write("attempt\n")
        if len(attempts.read_text().splitlines()) <= failures:
            raise OSError(f"{attempts}: simulated failure")
        return read()

    return read_or_fail


def flaky_inputs(monkeypatch, attempts: Path, failures: int) -> None:
    """Make input 3 (the first of shard 1) fail its first `failures` reads, in the Ray task that reads it."""
    real = prepare_run.enumerate_inputs

    def enumerate_inputs(cfg: PrepareConfig):
        total, items = real(cfg)
        items = list(items)
        items[3] = dataclasses.replace(items[3], read=failing_read(items[3].read, attempts, failures))
        return total, items

    monkeypatch.setattr(prepare_run, "enumerate_inputs", enumerate_inputs)


def test_ray_writes_the_same_shards_and_manifest_as_one_process(reference, ray_run):
    _, out1, m1, expected = reference
    out, m = ray_run
    assert m1["completed_shards"] == m["completed_shards"] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert shard_bytes(out, m) == shard_bytes(out1, m1)  # same keys, order and content, byte for byte
    assert m["shards"] == m1["shards"] and m["settings"] == m1["settings"]
    assert m["throughput"]["distributor"] == "ray" and m["throughput"]["workers"] == 2
    assert m["throughput"]["images"] == len(expected) and m["finished"] is True
    assert not ray.is_initialized() and ray_processes() == []  # prepare shut its own instance down


def test_corrupt_input_is_a_counted_drop(ray_run):
    _, m = ray_run
    assert m["inputs"] == 7 and m["kept"] == 3
    counts = {r: n for r, n in m["dropped"].items() if n}
    assert counts == {"unreadable": 1, "image_too_small": 1, "no_face": 1, "too_many_faces": 1}
    assert m["shards"]["shard-000001.tar"]["dropped"]["unreadable"] == 1  # e_broken.jpg, input 4


def test_resume_after_kill_with_ray(reference, ray_instance, tmp_path):
    """A kill during shard 1 (its entry and file missing, a half-written .tar.tmp left): the Ray run skips
    shards 0 and 2 and redoes shard 1, identical to the uninterrupted single-process run."""
    photos, out1, full, _ = reference
    out = tmp_path / "out"
    mtimes = kill_during_shard_1(out1, out)
    again = prep_main(["--input", str(photos), "--out", str(out), *SETTINGS, *RAY])
    assert_resumed(out, again, mtimes, out1, full)


def test_a_task_that_raises_once_is_retried(reference, ray_instance, tmp_path, monkeypatch):
    photos, out1, full, _ = reference
    attempts = tmp_path / "attempts.txt"
    flaky_inputs(monkeypatch, attempts, failures=1)
    out = tmp_path / "out"
    m = prep_main(["--input", str(photos), "--out", str(out), *SETTINGS, *RAY])
    assert len(attempts.read_text().splitlines()) == 2  # failed, then Ray's retry read it
    assert m["finished"] is True and m["shards"] == full["shards"]
    assert shard_bytes(out, m) == shard_bytes(out1, full)
    assert not (out / "shard-000001.tar.tmp").exists()  # the failed attempt removed its partial file


def test_a_task_that_keeps_failing_stops_the_run(reference, ray_instance, tmp_path, monkeypatch):
    photos = reference[0]
    attempts = tmp_path / "attempts.txt"
    flaky_inputs(monkeypatch, attempts, failures=MAX_RETRIES + 1)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated failure"):
        prep_main(["--input", str(photos), "--out", str(out), *SETTINGS, *RAY])
    assert len(attempts.read_text().splitlines()) == MAX_RETRIES + 1  # the first try and every retry
    assert not (out / "shard-000001.tar").exists()
    if (out / "manifest.json").exists():  # written once another shard completed before the failure
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["finished"] is False and "shard-000001.tar" not in manifest["shards"]


def test_ray_address_needs_the_ray_distributor(tmp_path):
    from datamodules.prepare.config import PrepareError

    with pytest.raises(PrepareError, match="--ray-address=auto needs --distributor ray"):
        prep_main(["--input", str(tmp_path), "--out", str(tmp_path / "out"), *SETTINGS, "--ray-address", "auto"])
