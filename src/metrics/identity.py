"""How much identity a set of embeddings carries: leave-one-out nearest-neighbour identification.

Used on the ID embedding's tokens (`UniPortraitModule.batch_identity_tokens`), whose job is to tell people
apart: the stage-2 router matches image positions against them, so it can route no better than they
separate the faces (docs/benchmarks.md: after the tiny stage 1 they identify far worse than the face
backbone they are computed from).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["nearest_neighbour_identification"]


def nearest_neighbour_identification(embeddings: Tensor, labels: Sequence[str]) -> float | None:
    """Share of samples whose nearest other sample (cosine, after removing the set's mean) has their label.

    Centring first matters for tokens with a large component shared by every identity (cosine ~0.99 between
    different people), which would otherwise swamp the differences. Only samples whose label occurs at least
    twice are queried (the others cannot be right); all samples are candidates.

    Args:
        embeddings: (M, ...) one embedding per sample (flattened to (M, D)).
        labels: M identity labels.
    Returns:
        accuracy in [0, 1], or None when no label occurs twice.
    """
    if embeddings.shape[0] != len(labels):
        raise ValueError(f"nearest_neighbour_identification: {embeddings.shape[0]} embeddings but {len(labels)} labels")
    x = embeddings.detach().flatten(1).double()  # (M, D)
    x = torch.nn.functional.normalize(x - x.mean(0, keepdim=True), dim=1)
    index = {name: i for i, name in enumerate(sorted(set(labels)))}
    y = torch.tensor([index[name] for name in labels])  # (M,)
    same = y[:, None] == y[None, :]  # (M, M)
    same.fill_diagonal_(False)
    queried = same.any(1)  # (M,) the label occurs again
    if not bool(queried.any()):
        return None
    sim = x @ x.T  # (M, M)
    sim.fill_diagonal_(float("-inf"))
    hit = y[sim.argmax(1)] == y  # (M,)
    return float(hit[queried].double().mean())
