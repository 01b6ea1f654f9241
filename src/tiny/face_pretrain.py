"""Recognition pretraining for the tiny preset's face backbone (the real one comes pretrained).

UniPortrait relies on the backbone being a *recognition* network: its deep map carries identity
and its shallow maps carry structure. A random tiny backbone carries neither, so the tiny preset
first trains it as a classifier with an additive angular margin (ArcFace-style) head on synthetic
identities, then freezes it.

- ``MarginHead``: cosine classifier with margin: logits = s * cos(theta_y + m) for the target
  class, s * cos(theta_j) otherwise.
- ``pretrain_recognition``: AdamW on backbone + head, light augmentation (small shifts,
  brightness/contrast jitter; horizontal flip off by default because synthetic identities may be
  asymmetric), BatchNorm statistics recalibrated at the end, backbone returned frozen.
- ``evaluate_verification``: leave-one-out nearest-centroid accuracy of the L2-normalised
  embeddings (a cheap proxy for verification quality), or of the pooled last-stage map.
- ``pooled_weight``: a second margin head on the spatial mean of the last stage's map, so that
  identity lives in the 49 ``F_r`` tokens the Q-Former reads and not only in their layout
  (``pooled_features``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from src.models.face_backbone import FaceFeatures, IRBackbone, freeze


def pooled_features(feats: FaceFeatures) -> torch.Tensor:
    """Spatial mean of the last stage's map: (B, w3, 7, 7) -> (B, w3).

    UniPortrait never reads the 512-d embedding: its Q-Former attends over the 49 tokens of this
    map (``F_r``) with no positional information, so what reaches the identity tokens is a content-
    weighted average of them. A real IR-101 map carries identity at every position; a tiny
    backbone trained only through its ``Flatten -> Linear`` head can instead spread identity over
    *where* features sit. A margin loss on this mean keeps identity in the tokens themselves
    (``python -m src.tiny --face-pooled-weight 1``; ``tiny_report.json`` gives the identification by
    the embedding and by this mean, before and after). It is off in ``make tiny`` by default: stage-2
    routing did not improve with it (docs/benchmarks.md, "Findings behind the defaults").
    """
    return feats.stages[3].mean(dim=(2, 3))


class MarginHead(nn.Module):
    """Additive angular margin classifier (ArcFace; CurricularFace adds a hard-example term on top).

    Args:
        embedding_size: embedding dim D.
        num_classes: number of identities C.
        scale: logit scale s (the softmax temperature on cosines).
        margin: additive angular margin m (radians) on the target class.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 32.0, margin: float = 0.4) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"MarginHead needs num_classes >= 2, got {num_classes}")
        self.scale = float(scale)
        self.margin = float(margin)
        # Class centres; only their direction matters (they are L2-normalised in forward), so a small
        # normal init (TFace uses std 0.01) just gives random, nearly orthogonal directions.
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C) cosine between each embedding and each class centre."""
        return F.normalize(embedding, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    def forward(self, embedding: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """embedding (B, D), labels (B,) long or None -> logits (B, C).

        With labels, the target logit becomes s * cos(theta + m); where theta + m would pass pi
        (cos no longer decreasing) it falls back to s * (cos(theta) - m * sin(m)), as in ArcFace.
        Without labels (inference), plain s * cos(theta).
        """
        cos = self.cosine(embedding).clamp(-1 + 1e-7, 1 - 1e-7)  # (B, C)
        if labels is None:
            return self.scale * cos
        target = cos.gather(1, labels[:, None])  # (B, 1)
        sin = (1 - target.pow(2)).sqrt()
        with_margin = target * math.cos(self.margin) - sin * math.sin(self.margin)  # cos(theta + m)
        fallback = target - self.margin * math.sin(self.margin)
        threshold = math.cos(math.pi - self.margin)
        new_target = torch.where(target > threshold, with_margin, fallback)
        logits = cos.scatter(1, labels[:, None], new_target)
        return self.scale * logits


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    max_shift: float = 0.06,
    brightness: float = 0.15,
    contrast: float = 0.2,
    flip: bool = False,
) -> torch.Tensor:
    """Light photometric/geometric jitter of face crops, per sample.

    x: (B, 3, H, W) in [-1, 1] -> same shape. Shifts up to ``max_shift`` of the crop size (border
    padding), contrast x U(1 - c, 1 + c) around the per-image mean, brightness + U(-b, b), optional
    horizontal flip with p = 0.5.
    """
    b = x.shape[0]
    dev = x.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = (uniform(b, 2) * 2 - 1) * 2 * max_shift  # grid coords span 2 units per image
    if flip:
        theta[:, 0, 0] = torch.where(uniform(b) < 0.5, -1.0, 1.0)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, 3, H, W)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = 1 + (uniform(b, 1, 1, 1) * 2 - 1) * contrast
    br = (uniform(b, 1, 1, 1) * 2 - 1) * brightness
    return ((x - mean) * c + mean + br).clamp(-1, 1)


@torch.no_grad()
def embed(backbone: IRBackbone, crops: torch.Tensor, batch_size: int = 128, pooled: bool = False) -> torch.Tensor:
    """(M, 3, 112, 112) -> (M, D) embeddings (or, with ``pooled``, (M, w3) ``pooled_features``), in
    batches, with the backbone's current mode."""
    dev = next(backbone.parameters()).device
    out = []
    for i in range(0, len(crops), batch_size):
        feats = backbone(crops[i : i + batch_size].to(dev))
        out.append(pooled_features(feats) if pooled else feats.embedding)
    return torch.cat(out)


@torch.no_grad()
def recalibrate_batchnorm(backbone: IRBackbone, crops: torch.Tensor, batch_size: int = 64) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``crops`` (no augmentation).

    After a short training run the momentum-averaged statistics still lag the final weights; a
    cumulative pass (momentum=None) makes eval-mode features match the trained network.
    """
    bns = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    backbone.train()
    dev = next(backbone.parameters()).device
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        if len(chunk) > 1:  # BatchNorm1d cannot use a batch of 1 in train mode
            backbone(chunk.to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    backbone.eval()


def _check_inputs(crops: torch.Tensor, labels: torch.Tensor) -> None:
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be (M, 3, H, W), got {tuple(crops.shape)}")
    if labels.ndim != 1 or labels.shape[0] != crops.shape[0]:
        raise ValueError(f"labels must be (M,) with M={crops.shape[0]}, got {tuple(labels.shape)}")


def pretrain_recognition(
    backbone: IRBackbone,
    crops: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    augment: bool = True,
    progress: bool = True,
    flip: bool = False,
    scale: float = 32.0,
    margin: float = 0.4,
    pooled_weight: float = 0.0,
) -> dict[str, float]:
    """Train ``backbone`` as an identity classifier with a ``MarginHead``; leaves it frozen in eval mode.

    Args:
        backbone: the IR backbone to train (in place).
        crops: (M, 3, 112, 112) aligned crops in [-1, 1].
        labels: (M,) identity ids in [0, C).
        steps: optimiser steps (batches sampled with replacement).
        batch_size, lr: AdamW settings (weight decay 5e-4 as usual for recognition).
        seed: seeds batch sampling, augmentation, the head init and dropout; the global RNG state
            is restored afterwards.
        augment: apply ``augment_batch``; ``flip`` enables horizontal flips (off: synthetic
            identities may be asymmetric).
        progress: print a line every ~10% of the steps.
        scale, margin: ``MarginHead`` settings.
        pooled_weight: weight of a second margin loss on the spatial mean of the last stage's map
            (``F_r`` averaged over its 49 positions); 0 turns it off. See ``pooled_features``.

    Returns:
        {"accuracy": training accuracy (no margin) and "loss": margin loss, each averaged over
        the last 10% of steps (at least 1), "steps": steps}.
    """
    _check_inputs(crops, labels)
    if pooled_weight < 0:
        raise ValueError(f"pretrain_recognition: pooled_weight must be >= 0, got {pooled_weight}")
    labels = labels.long()
    num_classes = int(labels.max()) + 1
    dev = next(backbone.parameters()).device
    window = max(1, steps // 10)
    accs: list[float] = []
    losses: list[float] = []
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        head = MarginHead(backbone.embedding_size, num_classes, scale=scale, margin=margin).to(dev)
        params = list(backbone.parameters()) + list(head.parameters())
        pooled_head = None  # built only when used, so pooled_weight=0 keeps the RNG stream of a plain run
        if pooled_weight > 0:
            pooled_head = MarginHead(backbone.intrinsic_dim, num_classes, scale=scale, margin=margin).to(dev)
            params += list(pooled_head.parameters())
        backbone.frozen = False
        backbone.requires_grad_(True)
        backbone.train()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-4)
        for step in range(steps):
            idx = torch.randint(0, len(crops), (min(batch_size, len(crops)),), generator=gen)
            x = crops[idx].to(dev)  # (b, 3, 112, 112)
            y = labels[idx].to(dev)  # (b,)
            if augment:
                x = augment_batch(x, gen, flip=flip)
            feats = backbone(x)
            emb = feats.embedding  # (b, D)
            loss = F.cross_entropy(head(emb, y), y)
            if pooled_head is not None:
                loss = loss + pooled_weight * F.cross_entropy(pooled_head(pooled_features(feats), y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                acc = (head(emb.detach()).argmax(-1) == y).float().mean().item()
            accs.append(acc)
            losses.append(loss.item())
            if progress and (step + 1) % max(1, steps // 10) == 0:
                print(f"[face pretrain] step {step + 1}/{steps} loss {loss.item():.3f} acc {acc:.3f}")
        recalibrate_batchnorm(backbone, crops)
    freeze(backbone)
    return {
        "accuracy": sum(accs[-window:]) / window,
        "loss": sum(losses[-window:]) / window,
        "steps": float(steps),
    }


@torch.no_grad()
def evaluate_verification(
    backbone: IRBackbone, crops: torch.Tensor, labels: torch.Tensor, pooled: bool = False
) -> float:
    """Leave-one-out nearest-centroid accuracy of L2-normalised embeddings (in [0, 1]); with ``pooled``,
    of the spatial means of the last stage's map (``pooled_features``, what the Q-Former can average).

    Each crop is assigned to the class whose centroid (mean normalised embedding of that class's
    *other* crops) has the highest cosine. Every class needs at least 2 crops. The backbone is run
    in eval mode and its mode is restored afterwards.
    """
    _check_inputs(crops, labels)
    labels = labels.long().cpu()
    counts = torch.bincount(labels)
    present = counts > 0
    if (counts[present] < 2).any():
        bad = torch.nonzero(present & (counts < 2)).flatten().tolist()
        raise ValueError(f"evaluate_verification needs >= 2 crops per class; classes {bad} have 1")
    was_training = backbone.training
    backbone.eval()
    e = F.normalize(embed(backbone, crops, pooled=pooled).float().cpu(), dim=-1)  # (M, D)
    backbone.train(was_training)
    num_classes = counts.shape[0]
    sums = torch.zeros(num_classes, e.shape[1]).index_add_(0, labels, e)  # (C, D)
    sim = e @ sums.t()  # (M, C) dot with class sums
    own = F.one_hot(labels, num_classes).bool()  # (M, C)
    sim = sim - own.float()  # remove the crop itself (e . e = 1) from its own class sum
    # cosine to a centroid = (e . sum) / ||sum|| (the class size cancels); for the crop's own class
    # the sum without the crop has its own norm
    sum_norm = sums.norm(dim=-1)[None, :].expand(len(e), -1).clone()  # (M, C)
    own_sum = sums[labels] - e  # (M, D) own-class sum without the crop
    sum_norm[own] = own_sum.norm(dim=-1)
    cos = sim / sum_norm.clamp(min=1e-8)
    cos[:, ~present] = -float("inf")
    pred = cos.argmax(-1)
    return (pred == labels).float().mean().item()
