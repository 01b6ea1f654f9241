"""`--distributor ray` for the latent cache (datamodules/latents.py): each shard still to cache is a Ray task
running the same `cache_shard`, on a local Ray instance or on a cluster (`datamodules.prepare.distributed.connect`,
which also says why Ray rather than Spark).

A task asks for one GPU with --device cuda (Ray gives each its own through CUDA_VISIBLE_DEVICES, so eight GPUs
cache eight shards at once), else one CPU; each Ray worker process loads the VAE once and keeps it for its next
tasks. Ray retries a task that raises or whose worker dies (`MAX_RETRIES`). The driver records each finished
shard in latent_cache.json as it completes, so a killed run resumes as the local one does, and the shards and
the manifest are byte for byte those of the local run. On a cluster every node needs this project, the VAE,
the inputs and --out at the same paths (a shared filesystem).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from datamodules.buckets import Bucket
from datamodules.prepare.distributed import MAX_RETRIES, cancelled_on_error, connected

_LOADED: dict = {}  # in a Ray worker process: the VAE of the (path, device) it was loaded for


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=True)
def _cache_task(worker: tuple[Callable[..., Any], Callable[..., dict[str, int]]], url: str, out: Path,
                vae_path: str, resolution: int | None, buckets: Sequence[Bucket] | None, batch_size: int,
                device: str) -> dict[str, int]:
    load_vae, cache_shard = worker
    key = (vae_path, device)
    if _LOADED.get("key") != key:
        _LOADED["vae"], _LOADED["key"] = load_vae(vae_path).to(device), key
    return cache_shard(url, out, _LOADED["vae"], resolution, batch_size, device, buckets)


def run_ray(worker: tuple[Callable[..., Any], Callable[..., dict[str, int]]], urls: Sequence[str], out_dir: Path,
            vae_path: str, resolution: int | None, buckets: Sequence[Bucket] | None, batch_size: int, device: str,
            record: Callable[[str, dict], None], address: str | None, workers: int, bar: tqdm) -> None:
    """Cache `urls` into `out_dir` as Ray tasks, with `worker` = (latents.load_vae, latents.cache_shard)
    (`latents.cache_shards`, which imports this module, hands both over); `record(url, counts)` runs here, in
    the driver, as each finishes. A task that still fails after its retries is raised here (the shards done so
    far are recorded) and the others are cancelled."""
    with connected(address, workers):
        resources = {"num_gpus": 1, "num_cpus": 1} if str(device).startswith("cuda") else {"num_cpus": 1}
        task = _cache_task.options(**resources)
        vae = str(Path(vae_path).resolve())  # absolute paths: a worker's working directory is its own
        pending: dict[ray.ObjectRef, str] = {}
        with cancelled_on_error(pending):
            for url in urls:
                pending[task.remote(worker, str(Path(url).resolve()), (out_dir / Path(url).name).resolve(), vae,
                                    resolution, buckets, batch_size, str(device))] = url
            while pending:
                finished, _ = ray.wait(list(pending), num_returns=1)
                for ref in finished:
                    record(pending.pop(ref), ray.get(ref))
                    bar.update()
