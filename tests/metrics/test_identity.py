"""nearest_neighbour_identification: how much identity a set of embeddings carries."""
from __future__ import annotations

import pytest
import torch

from src.metrics.identity import nearest_neighbour_identification


def _people(k: int, per: int, spread: float, shared: float, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """k identities x `per` samples: a shared offset + an identity centre + per-sample noise, as (M, 4, 8) tokens."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, 4, 8, generator=g)
    x = shared * torch.ones(4, 8) + centres.repeat_interleave(per, 0) + spread * torch.randn(k * per, 4, 8, generator=g)
    return x, [f"id{i}" for i in range(k) for _ in range(per)]


def test_separated_identities_are_found_despite_a_dominant_shared_component() -> None:
    x, labels = _people(12, 3, spread=0.2, shared=50.0)
    raw = torch.nn.functional.normalize(x.flatten(1), dim=1)
    assert float((raw @ raw.T).min()) > 0.95  # every pair looks alike before centring (like the tiny Q-Former's tokens)
    assert nearest_neighbour_identification(x, labels) == 1.0


def test_embeddings_without_identity_score_near_chance() -> None:
    x, labels = _people(12, 3, spread=0.2, shared=0.0)
    shuffled = [labels[i] for i in torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert nearest_neighbour_identification(x, shuffled) < 0.35  # chance 2/35
    noisy, _ = _people(12, 3, spread=3.0, shared=0.0)
    assert 0.1 < nearest_neighbour_identification(noisy, labels) < 0.9  # partial separation -> partial score


def test_only_labels_seen_twice_are_queried_and_mismatches_are_errors() -> None:
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0]])
    # a and a are each other's neighbour; the lone b and c are not queried
    assert nearest_neighbour_identification(x, ["a", "a", "b", "c"]) == 1.0
    assert nearest_neighbour_identification(x, ["a", "b", "c", "d"]) is None
    with pytest.raises(ValueError, match="3 labels"):
        nearest_neighbour_identification(x, ["a", "a", "b"])
