"""Reference face crops -> identity tokens: frozen face backbone + frozen CLIP tower + the
trainable ID embedding (Q-Former). Shared by training (src/module.py) and inference (src/inference/pipeline.py).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import cast

import torch
from torch import nn

from src.conventions import to_clip_pixels, to_recog_pixels
from src.models.clip_encoder import ClipPatchEncoder
from src.models.face_backbone import IRBackbone
from src.models.id_embedding import IDEmbedding

log = logging.getLogger(__name__)


class FeatureCache:
    """Memo of the frozen encoders' features per face row, keyed by a content fingerprint of its crops.

    The face backbone and the CLIP tower never change during training, so a face crop that comes back
    (the same sample in a later epoch) has the same features: looking them up skips both forwards. Keys
    are the data pipeline's `face_digest` (datamodules.collate: a hash of the crops' uint8 bytes), so a
    crop that changes (another reference photo, an augmentation) is simply a new key. Least recently
    used entries are evicted beyond `max_faces`. Entries stay on the device they were computed on;
    the cache empties itself if the encoders' device or dtype changes. Not saved in checkpoints: a
    resumed run refills it. Features of a face computed alone can differ from the same face computed
    in a batch in the last float bit (the convolution algorithm depends on the batch size), so a run
    with the cache equals one without it up to that rounding.
    """

    def __init__(self, max_faces: int) -> None:
        if max_faces < 1:
            raise ValueError(f"FeatureCache: max_faces must be >= 1, got {max_faces}")
        self.max_faces = max_faces
        self.entries: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.tag: tuple[torch.device, torch.dtype] | None = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entry of `key` (now the most recently used) or None; counted as a hit or a miss."""
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
            self.entries.move_to_end(key)
        return found

    def put(self, key: int, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if not self.entries and not self.hits:
            per_face = sum(v.numel() * v.element_size() for v in value)
            log.info("frozen-feature cache: %.1f KB per face on %s, up to %d faces (%.2f GB)", per_face / 1024,
                     value[0].device, self.max_faces, per_face * self.max_faces / 1024**3)
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_faces:
            self.entries.popitem(last=False)

    def check_tag(self, device: torch.device, dtype: torch.dtype) -> None:
        if self.tag != (device, dtype):
            self.entries.clear()
            self.tag = (device, dtype)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class IdentityEncoder(nn.Module):
    """F_r (intrinsic), F_s (structure + CLIP) and the Q-Former, for M faces with R references each.

    The backbone and CLIP tower are frozen (eval, no grad); only `embedding` is trainable. `cache`
    (a FeatureCache, off by default) memoises their features for rows that come with a key.
    """

    def __init__(self, face: IRBackbone, clip: ClipPatchEncoder, embedding: IDEmbedding,
                 cache: FeatureCache | None = None) -> None:
        super().__init__()
        self.face = face.requires_grad_(False).eval()
        self.clip = clip.requires_grad_(False).eval()
        self.embedding = embedding
        self.cache = cache

    def train(self, mode: bool = True) -> IdentityEncoder:
        super().train(mode)
        self.face.eval()  # frozen parts stay in eval mode (BatchNorm statistics, dropout)
        self.clip.eval()
        return self

    @property
    def output_dim(self) -> int:
        return self.embedding.proj_out.out_features

    @torch.no_grad()
    def features(
        self, recog: torch.Tensor, clip_crop: torch.Tensor, keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """recog (M, R, 3, h, w), clip_crop (M, R, 3, s, s), both in [-1, 1]
        -> intrinsic (M, R*49, C_id), structure (M, R*G*G, C_struct) (R references concatenated).

        keys: optional (M,) int64 content fingerprints of the rows; with a `cache`, rows whose key is
        cached are looked up and only the others go through the encoders.
        """
        if self.cache is None or keys is None:
            return self._encode(recog, clip_crop)
        if keys.shape != recog.shape[:1]:
            raise ValueError(f"IdentityEncoder.features: keys must be ({recog.shape[0]},), got {tuple(keys.shape)}")
        p = next(self.face.parameters())
        self.cache.check_tag(p.device, p.dtype)
        key_list = keys.tolist()
        found = [self.cache.get(k) for k in key_list]
        miss = [i for i, f in enumerate(found) if f is None]
        if miss:
            intrinsic, structure = self._encode(recog[miss], clip_crop[miss])  # (M', R*49, C_id), (M', R*G*G, C)
            for j, i in enumerate(miss):
                entry = (intrinsic[j].clone(), structure[j].clone())
                found[i] = entry
                self.cache.put(key_list[i], entry)
        rows = cast("list[tuple[torch.Tensor, torch.Tensor]]", found)  # every row is filled now
        return torch.stack([f[0] for f in rows]), torch.stack([f[1] for f in rows])

    def _encode(self, recog: torch.Tensor, clip_crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoders' forward (see `features`)."""
        m, r = recog.shape[:2]
        feats = self.face(to_recog_pixels(recog.flatten(0, 1)))
        intrinsic = self.face.intrinsic_tokens(feats)  # (M*R, 49, C_id)
        clip_tokens = self.clip(to_clip_pixels(clip_crop.flatten(0, 1), self.clip.image_size))  # (M*R, G*G, Wc)
        shallow = self.face.structure_tokens(feats, self.clip.grid)  # (M*R, G*G, w0+w1+w2)
        structure = torch.cat([shallow, clip_tokens], dim=-1)  # (M*R, G*G, C_struct)
        return intrinsic.reshape(m, -1, intrinsic.shape[-1]), structure.reshape(m, -1, structure.shape[-1])

    @torch.no_grad()
    def uncond_features(self, m: int, r: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional branch of the reference code: zero intrinsic features, zero structure
        features, and the CLIP features of an all-zero (normalised) image."""
        p = next(self.clip.parameters())
        zero_px = torch.zeros(1, 3, self.clip.image_size, self.clip.image_size, device=p.device, dtype=p.dtype)
        clip_tokens = self.clip(zero_px)  # (1, G*G, Wc)
        g2 = clip_tokens.shape[1]
        intrinsic = clip_tokens.new_zeros(m, r * 49, self.face.intrinsic_dim)
        shallow = clip_tokens.new_zeros(m, r * g2, self.face.structure_dim)
        structure = torch.cat([shallow, clip_tokens.repeat(m, r, 1)], dim=-1)
        return intrinsic, structure

    def forward(
        self,
        recog: torch.Tensor,
        clip_crop: torch.Tensor,
        beta: float | torch.Tensor = 1.0,
        drop: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """recog (M, R, 3, h, w), clip_crop (M, R, 3, s, s) -> identity tokens (M, Q, D).

        drop: optional bool (M,): those faces use the unconditional features (condition dropout).
        keys: optional (M,) int64 content fingerprints for the feature cache (see `features`).
        """
        intrinsic, structure = self.features(recog, clip_crop, keys)
        if drop is not None and bool(drop.any()):
            u_int, u_struct = self.uncond_features(recog.shape[0], recog.shape[1])
            keep = (~drop).to(intrinsic.dtype).view(-1, 1, 1)
            intrinsic = intrinsic * keep + u_int * (1 - keep)
            structure = structure * keep + u_struct * (1 - keep)
        return self.embedding(intrinsic, structure, beta=beta)  # (M, Q, D)

    def uncond_tokens(self, m: int, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Identity tokens of the unconditional branch, (m, Q, D) (classifier-free guidance)."""
        intrinsic, structure = self.uncond_features(m)
        return self.embedding(intrinsic, structure, beta=beta)
