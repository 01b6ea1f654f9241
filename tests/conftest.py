"""Shared fixtures: a miniature world (synthetic shards + tiny pretrained components) built once
per test session by the same code as `make tiny`, with very few pretraining steps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# One intra-op thread: the test processes (and DataLoader workers) share 2 cores; oversubscribed
# OpenMP threads made tiny forward passes 100x slower here.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from datamodules.synthetic import SyntheticConfig
    from src.tiny import build

    root = tmp_path_factory.mktemp("tiny_world")
    data = SyntheticConfig(identities=16, unseen=4, single=128, multi=128, heldout=32, samples_per_shard=32,
                           seed=0, progress=False)
    with torch.random.fork_rng():
        build(root, seed=0, data=data, vae_steps=2, unet_steps=2, face_steps=2, pretrain_images=64)
    return root


@pytest.fixture(autouse=True)
def _hermetic_cwd(tmp_path, monkeypatch):
    """Run every test in its own folder: configs write relative paths (runs/tiny/...), which must
    never touch the checkout's own runs or artifacts."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A config may set `torch_threads` (configs/tiny/stage1.yaml sets 2, stage2.yaml inherits it) and the
    CLI applies it to this process; put the suite's one thread back after every test, so no test inherits it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
