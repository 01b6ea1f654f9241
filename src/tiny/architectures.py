"""The embedded default's tiny architectures: SD1.5-shaped networks small enough to train on a CPU.

Random weights; `src.tiny.world.build` pretrains (or copies the shipped pretrained weights of) the UNet,
VAE and face backbone and writes every part to disk in its real format, so the SD1.5 loading code
(`src.models.presets.ComponentPaths`) reads them unchanged.

The tiny SDXL world's networks (`tiny_sdxl_unet`, `tiny_sdxl_text_encoders`; written by `src.tiny.sdxl`)
are here too: a "text_time" UNet conditioned on two text encoders, as SDXL.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from src.models.presets import ComponentPaths

TINY_CROSS_DIM = 64
TINY_FACE_WIDTHS = (16, 32, 64, 128)
TINY_FACE_EMBEDDING = 128
TINY_CLIP_VISION = {"image_size": 56, "patch_size": 7, "width": 64, "layers": 3, "head_width": 16}
TINY_CLIP_EMBED_DIM = 64
# Tiny SDXL: hidden sizes of text_encoder / text_encoder_2 (SDXL: 768 / 1280), concatenated to the UNet's
# cross_attention_dim (SDXL: 2048; here the tiny SD1.5 world's 64); pooled dim (SDXL: 1280); time-id
# embedding width (SDXL: 256).
TINY_SDXL_HIDDEN = (32, 32)
TINY_SDXL_POOLED = 32
TINY_SDXL_TIME_EMBED = 8


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


def _text_config(hidden_size: int, pad_token_id: int = 49407, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        **kw,
    )


def tiny_text_encoder(hidden_size: int = TINY_CROSS_DIM) -> CLIPTextModel:
    return CLIPTextModel(_text_config(hidden_size))


def tiny_sdxl_text_encoders(
    hidden: tuple[int, int] = TINY_SDXL_HIDDEN, pooled: int = TINY_SDXL_POOLED
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's pair: a CLIPTextModel and a CLIPTextModelWithProjection (its projected `text_embeds` are the
    pooled condition); two layers each, so the penultimate hidden states SDXL reads are the first layer's.
    The second pads with "!" (id 0), as SDXL's tokenizer_2."""
    return (CLIPTextModel(_text_config(hidden[0])),
            CLIPTextModelWithProjection(_text_config(hidden[1], pad_token_id=0, projection_dim=pooled)))


def tiny_sdxl_unet(sample_size: int = 16, hidden: tuple[int, int] = TINY_SDXL_HIDDEN, pooled: int = TINY_SDXL_POOLED,
                   time_embed_dim: int = TINY_SDXL_TIME_EMBED) -> UNet2DConditionModel:
    """SDXL-shaped UNet: "text_time" added conditioning (pooled text + 6 time ids), linear projections,
    two transformer layers in the second block, cross_attention_dim = the two text encoders' hidden sizes.

    Widths and resolutions are the tiny SD1.5 UNet's (cross-attention at 16x16 and 8x8 latents): SDXL's own
    first level has no cross-attention, which at the tiny world's 64 px would leave routing maps at 8x8.
    """
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=sum(hidden),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),  # heads per block (diffusers' name), head width 16
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled,  # SDXL: 6 * 256 + 1280 = 2816
        norm_num_groups=16,
    )



def build_tiny_clip(seed: int):
    """A tiny OpenCLIP CLIP model (vision + text towers) in open_clip's own class."""
    import open_clip

    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(**TINY_CLIP_VISION)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=TINY_CLIP_EMBED_DIM, vision_cfg=vision, text_cfg=text)


def tiny_components(root: Path) -> ComponentPaths:
    """The ComponentPaths of the embedded default under `root` (what configs/tiny/*.yaml point at; the tiny
    SDXL world under its own root has the same layout, see `src.tiny.sdxl`)."""
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
