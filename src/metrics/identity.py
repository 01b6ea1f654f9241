"""How much identity a set of embeddings carries, and which image of a batch can stand in as "another person".

- `nearest_neighbour_identification`: leave-one-out nearest-neighbour identification, used on the ID
  embedding's tokens (`UniPortraitModule.batch_identity_tokens`), whose job is to tell people apart. It
  measures the tokens on their own; the stage-2 router matches image positions against them, a different
  task, so neither figure bounds the other.
- `other_identity_partners`: for each image, another image of the batch with none of its identities
  (the identity probe's "other identity", `UniPortraitModule.identity_gap`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["nearest_neighbour_identification", "other_identity_partners"]


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


def other_identity_partners(identities: Sequence[Sequence[str | None]]) -> list[int | None]:
    """For each image, the next image of the batch (cyclically) that shares none of its identity labels.

    Args:
        identities: B lists of identity labels, one per face slot (None: padding or an unknown identity).
    Returns:
        B indices, or None for an image with no known identity or with no such partner in the batch
        (e.g. a batch of one person). Unlike `roll(1)`, a partner is never the same person.
    """
    names = [{n for n in ids if n is not None} for ids in identities]
    b = len(names)
    partners: list[int | None] = []
    for i, own in enumerate(names):
        later = ((i + k) % b for k in range(1, b))
        partners.append(next((j for j in later if names[j] and not own & names[j]), None) if own else None)
    return partners
