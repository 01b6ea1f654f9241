"""`--distributor ray`: the shards still to write are Ray tasks, on a local Ray instance or on a cluster.

Each task is the same per-shard task as `--workers` (`run.init_worker` once per Ray worker process, then
`run.worker_shard`; `run.prepare`, which imports this module, hands both over), one CPU each; Ray retries a
task that raises or whose worker dies (`MAX_RETRIES`). The driver (the process running `prepare`) keeps
everything else exactly as the local path does: it streams the inputs into shard slots, skips completed
shards, resumes, and writes the manifest and its summary as each task completes. A killed run leaves only
``.tar.tmp`` files of the shards in progress, redone next run.

Why Ray rather than Spark (img2dataset offers both): Ray installs with pip (no JVM, no Hadoop), runs plain
Python functions as tasks with retries built in, and starts a local instance inside the driver, which is
what the tests and one-machine runs use; the same code then runs on a cluster (`ray start --head` on one
machine, `ray start --address HOST:PORT` on the others, then `--ray-address auto` or `HOST:PORT`).

On a cluster every node needs this project installed (the same versions) and the inputs, the --captions
table's paths and --out at the same paths (a shared filesystem): tasks read their inputs and write their
shard files themselves, the driver sends each task its slot (keys and readers) and writes only the manifest.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from tqdm import tqdm

from datamodules.prepare.config import PrepareConfig

MAX_RETRIES = 3  # attempts after the first, per shard task (an exception or a lost worker)
GPU_SHARE = 0.25  # --device cuda: the fraction of a GPU a task asks for (four shard tasks share one GPU)

_LOADED: dict = {}  # in a Ray worker process: the (settings, caption table) its runtime was built for


@ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=True)
def _shard_task(
    worker: tuple[Callable[..., None], Callable[[str, list], tuple[dict, int]]], cfg: PrepareConfig,
    table_box: list[ray.ObjectRef], name: str, slot: list,
) -> tuple[dict, int]:
    """Write shard `name` from its slot of (index, SourceItem) with worker = (init_worker, worker_shard);
    (manifest entry, inputs). The detector, captioner and caption table are built once per worker process
    and kept for its next tasks of the run (the table travels once through Ray's object store, boxed so that
    a task fetches it only when its process has not yet)."""
    init, shard = worker
    key = (cfg, table_box[0].hex())
    if _LOADED.get("key") != key:
        init(cfg, ray.get(table_box[0]))
        _LOADED["key"] = key
    return shard(name, slot)


def connect(address: str | None, workers: int) -> bool:
    """Connect to the cluster at `address` (--ray-address), or start a local instance with `workers` CPUs (one
    already started in this process is used as it is); True when this call connected (and so must shut down).
    Shared by the shard preparation and the latent cache (datamodules/latents_ray.py)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage reports (read when Ray starts its processes)
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return True
    # local only: no dashboard, and the node address given, so Ray does not probe for an outward interface
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return True


@contextmanager
def connected(address: str | None, workers: int) -> Iterator[None]:
    """`connect` for the body, and Ray shut down after it when this call started or joined the instance."""
    owned = connect(address, workers)
    try:
        yield
    finally:
        if owned:
            ray.shutdown()


@contextmanager
def cancelled_on_error(pending: dict[ray.ObjectRef, Any]) -> Iterator[None]:
    """Cancel the tasks still in `pending` when the body raises (a task's final failure, a Ctrl-C)."""
    try:
        yield
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def run_ray(
    cfg: PrepareConfig, table: dict[str, str], tasks: Iterator[tuple[str, Iterable]], bar: tqdm,
    done: Callable[[str, dict, int], None], worker: tuple[Callable[..., None], Callable[[str, list], Any]],
) -> int:
    """Run the shard tasks as Ray tasks, with `worker` = (run.init_worker, run.worker_shard); at most 2 per
    CPU of the Ray instance are queued, so streamed inputs are not all held in memory. `done(name, entry,
    inputs)` is called here, in the driver, as each completes. Returns the CPUs Ray offers (the tasks that run
    at once). A task that still fails after its retries is raised here (the shards done so far are in the
    manifest) and the queued ones are cancelled."""
    with connected(cfg.ray_address, cfg.workers):
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        table_box = [ray.put(table)]
        task = _shard_task.options(num_gpus=GPU_SHARE) if cfg.device.startswith("cuda") else _shard_task
        pending: dict[ray.ObjectRef, tuple[str, int]] = {}
        with cancelled_on_error(pending):
            for name, slot in tasks:
                items = list(slot)
                pending[task.remote(worker, cfg, table_box, name, items)] = (name, len(items))
                while len(pending) >= 2 * cpus:
                    _collect(pending, bar, done)
            while pending:
                _collect(pending, bar, done)
    return cpus


def _collect(
    pending: dict[ray.ObjectRef, tuple[str, int]], bar: tqdm, done: Callable[[str, dict, int], None]
) -> None:
    """Wait for a task and record it (a task's final exception is raised here)."""
    finished, _ = ray.wait(list(pending), num_returns=1)
    for ref in finished:
        name, n = pending.pop(ref)
        entry, inputs = ray.get(ref)
        bar.update(n)
        done(name, entry, inputs)
