"""Tiny random UNet2DConditionModels shaped like SD1.5 and SDXL, plus matching random inputs.

Import from tests: `from tests.models.tiny_unets import tiny_sd15_unet, tiny_sdxl_unet, unet_inputs`.
Construction is seeded inside a forked RNG, so it does not disturb the caller's random stream.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel


def tiny_sd15_unet(cross_attention_dim: int = 32, seed: int = 0, sample_size: int = 8) -> UNet2DConditionModel:
    """SD1.5-shaped: cross-attention blocks then a plain block (like SD1.5's last down block),
    one transformer layer per block, conv in/out projections, no added conditioning.

    Cross-attention layers (attn2): 1 down (full res) + 2 up (full res) + 1 mid (half res) = 4 at two
    resolutions; 8 attention processors in total (attn1 + attn2 per transformer block). Note that
    diffusers' `attn_processors` order is down -> up -> mid (module registration order).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
        )


def tiny_sdxl_unet(
    cross_attention_dim: int = 48, seed: int = 0, sample_size: int = 8, pooled_dim: int = 24, time_embed_dim: int = 8
) -> UNet2DConditionModel:
    """SDXL-shaped: plain first block, "text_time" added conditioning (pooled text + 6 time ids),
    linear projections, per-block transformer depth (1, 2), num heads per block (2, 4).
    Cross-attention layers: 2 down + 4 up + 2 mid = 8, all at half resolution (SDXL has no
    cross-attention at full resolution either).

    projection_class_embeddings_input_dim = pooled_dim + 6 * time_embed_dim (as SDXL's 1280 + 6*256).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim,
        )


def unet_inputs(
    unet: UNet2DConditionModel, batch: int = 2, seq_len: int = 7, hw: tuple[int, int] = (8, 8), seed: int = 0
) -> dict[str, Any]:
    """Random keyword inputs for `unet(**inputs)`: sample (B, 4, H, W), timestep (B,),
    encoder_hidden_states (B, S, cross_attention_dim) and, for "text_time" UNets, added_cond_kwargs
    {"text_embeds": (B, pooled), "time_ids": (B, 6)}."""
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, cfg.in_channels, *hw, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, seq_len, cfg.cross_attention_dim, generator=gen),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=gen),
            "time_ids": torch.tensor([[hw[0] * 8, hw[1] * 8, 0, 0, hw[0] * 8, hw[1] * 8]] * batch, dtype=torch.float32),
        }
    return inputs
