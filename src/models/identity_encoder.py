"""Reference face crops -> identity tokens: frozen face backbone + frozen CLIP tower + the
trainable ID embedding (Q-Former). Shared by training (src/module.py) and inference (src/pipeline.py).
"""
from __future__ import annotations

import torch
from torch import nn

from src.conventions import to_clip_pixels, to_recog_pixels
from src.models.clip_encoder import ClipPatchEncoder
from src.models.face_backbone import IRBackbone
from src.models.id_embedding import IDEmbedding


class IdentityEncoder(nn.Module):
    """F_r (intrinsic), F_s (structure + CLIP) and the Q-Former, for M faces with R references each.

    The backbone and CLIP tower are frozen (eval, no grad); only `embedding` is trainable.
    """

    def __init__(self, face: IRBackbone, clip: ClipPatchEncoder, embedding: IDEmbedding) -> None:
        super().__init__()
        self.face = face.requires_grad_(False).eval()
        self.clip = clip.requires_grad_(False).eval()
        self.embedding = embedding

    def train(self, mode: bool = True) -> "IdentityEncoder":
        super().train(mode)
        self.face.eval()  # frozen parts stay in eval mode (BatchNorm statistics, dropout)
        self.clip.eval()
        return self

    @property
    def output_dim(self) -> int:
        return self.embedding.proj_out.out_features

    @torch.no_grad()
    def features(self, recog: torch.Tensor, clip_crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """recog (M, R, 3, h, w), clip_crop (M, R, 3, s, s), both in [-1, 1]
        -> intrinsic (M, R*49, C_id), structure (M, R*G*G, C_struct) (R references concatenated)."""
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
    ) -> torch.Tensor:
        """recog (M, R, 3, h, w), clip_crop (M, R, 3, s, s) -> identity tokens (M, Q, D).

        drop: optional bool (M,): those faces use the unconditional features (condition dropout).
        """
        intrinsic, structure = self.features(recog, clip_crop)
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
