"""The embedded default's tiny architectures: SD1.5-shaped networks small enough to train on a CPU.

Random weights; `src.tiny.world.build` pretrains (or copies the shipped pretrained weights of) the UNet,
VAE and face backbone and writes every part to disk in its real format, so the SD1.5 loading code
(`src.models.presets.ComponentPaths`) reads them unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from src.models.presets import ComponentPaths

TINY_CROSS_DIM = 64
TINY_FACE_WIDTHS = (16, 32, 64, 128)
TINY_FACE_EMBEDDING = 128
TINY_CLIP_VISION = {"image_size": 56, "patch_size": 7, "width": 64, "layers": 3, "head_width": 16}
TINY_CLIP_EMBED_DIM = 64


def tiny_unet(sample_size: int = 16, cross_attention_dim: int = TINY_CROSS_DIM) -> UNet2DConditionModel:
    """Two-resolution SD1.5-shaped UNet: cross-attention at 16x16 and 8x8 latents (and the mid block)."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),  # first width >= latent channels (narrower plateaued in a prototype)
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def tiny_vae() -> AutoencoderKL:
    """Factor-4 VAE (64 px -> 16x16x4 latents)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def tiny_text_encoder(hidden_size: int = TINY_CROSS_DIM) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)



def build_tiny_clip(seed: int):
    """A tiny OpenCLIP CLIP model (vision + text towers) in open_clip's own class."""
    import open_clip

    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(**TINY_CLIP_VISION)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=TINY_CLIP_EMBED_DIM, vision_cfg=vision, text_cfg=text)


def tiny_components(root: Path) -> ComponentPaths:
    """The ComponentPaths of the embedded default under `root` (what configs/tiny/*.yaml point at)."""
    return ComponentPaths(
        base_model=str(root / "base"),
        clip_checkpoint=str(root / "clip.safetensors"),
        face_backbone=str(root / "face_backbone.safetensors"),
        clip_vision_config=dict(TINY_CLIP_VISION),
        clip_embed_dim=TINY_CLIP_EMBED_DIM,
        face_num_layers=18,
        face_widths=TINY_FACE_WIDTHS,
        face_embedding_size=TINY_FACE_EMBEDDING,
    )
