"""Node/worker splitting: across 2 ranks x 2 workers every sample is seen exactly once per epoch."""
from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from datamodules.datamodule import FaceShardDataModule
from datamodules.loader import resolve_shards
from datamodules.synthetic.dataset import SyntheticConfig, generate

WORLD = 2
WORKERS = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """8 shards of 3 samples (8 = a multiple of 2 ranks x 2 workers) and the list of all keys."""
    out = tmp_path_factory.mktemp("split")
    m = generate(out, SyntheticConfig(size=32, identities=4, unseen=2, single=24, multi=0, heldout=0,
                                      samples_per_shard=3, seed=2, progress=False))
    pattern = m["splits"]["single_train"]["path_pattern"]
    keys = [r["__key__"] for u in resolve_shards(pattern) for r in wds.tarfile_to_samples()([{"url": u}])]
    assert len(resolve_shards(pattern)) == 8 and len(set(keys)) == 24
    return pattern, keys


def epoch_keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def _rank_main(rank: int, port: int, pattern: str, out_dir: str) -> None:
    """One rank: gloo process group, DataModule with 2 workers; write the keys each pass saw."""
    # mp.spawn makes "spawn" this child's default start method, so every DataLoader pass would re-import torch in
    # fresh workers (~4 s each here); Lightning's DDP ranks are ordinary processes whose workers fork.
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        dm = FaceShardDataModule(pattern, val_shards=pattern, resolution=32, batch_size=2, num_workers=WORKERS,
                                 shuffle_buffer=4, seed=7)
        dm.setup("fit")
        train = dm.train_dataloader()
        passes = {"train_epoch0": epoch_keys(train), "train_epoch1": epoch_keys(train),
                  "val": epoch_keys(dm.val_dataloader())}
        gathered: list[dict] = [None] * WORLD  # type: ignore[list-item]
        dist.all_gather_object(gathered, passes)
        if rank == 0:
            Path(out_dir, "keys.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_two_workers_see_every_sample_once(shards: tuple[str, list[str]], tmp_path: Path) -> None:
    pattern, keys = shards
    mp.spawn(_rank_main, args=(_free_port(), pattern, str(tmp_path)), nprocs=WORLD, join=True)
    gathered = json.loads((tmp_path / "keys.json").read_text())
    for name in ("train_epoch0", "train_epoch1", "val"):
        per_rank = [g[name] for g in gathered]
        union = [k for r in per_rank for k in r]
        assert sorted(union) == sorted(keys), name  # every sample exactly once: no duplicates, none missing
        assert all(len(r) == 12 for r in per_rank), name  # 4 shards of 3 per rank
    # the shuffled epochs differ in order (same seed, new epoch), validation is in shard order per rank
    assert gathered[0]["train_epoch0"] != gathered[0]["train_epoch1"]


def test_split_follows_the_trainers_rank(shards: tuple[str, list[str]]) -> None:
    """Without torch.distributed, the attached trainer's global_rank/world_size decide the split."""
    torch.manual_seed(0)
    pattern, keys = shards
    seen = []
    for rank in range(WORLD):
        dm = FaceShardDataModule(pattern, resolution=32, batch_size=4, num_workers=0, shuffle_buffer=4, seed=7)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=WORLD, current_epoch=3)  # stands in for a Trainer
        dm.setup("fit")
        assert dm.rank_and_world() == (rank, WORLD)
        seen.append(epoch_keys(dm.train_dataloader()))
    assert sorted(seen[0] + seen[1]) == sorted(keys) and not set(seen[0]) & set(seen[1])


def test_validation_splits_samples_so_every_rank_gets_some_of_one_shard(shards: tuple[str, list[str]]) -> None:
    """A validation set of one shard on 2 ranks: each rank validates on every 2nd sample of it (split by shard,
    rank 1 had no batch, and a DDP run hung at its first validation's metric sync)."""
    pattern, keys = shards
    one = resolve_shards(pattern)[0]
    seen = []
    for rank in range(WORLD):
        dm = FaceShardDataModule(pattern, val_shards=one, resolution=32, batch_size=1, num_workers=WORKERS,
                                 shuffle_buffer=4, seed=7)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=WORLD, current_epoch=0)
        dm.setup("fit")
        seen.append(epoch_keys(dm.val_dataloader()))
    in_shard = [r["__key__"] for r in wds.tarfile_to_samples()([{"url": one}])]
    assert all(seen) and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(in_shard)
