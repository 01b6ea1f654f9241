"""Reliability tests: one intra-op thread per process (on a shared 2-core machine OpenMP's spin-waiting
makes multi-threaded tiny steps ~100x slower), seeded torch."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread_and_seed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
