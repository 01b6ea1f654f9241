"""How the UNet is conditioned on text, for both base-model architectures, as diffusers' pipelines do it.

SD1.5: encoder_hidden_states = text_encoder(ids).last_hidden_state, (B, 77, 768); no added conditions.

SDXL (`StableDiffusionXLPipeline.encode_prompt`, no clip skip): each text encoder's penultimate hidden states
(`hidden_states[-2]`), concatenated on the feature dim: (B, 77, 768 + 1280 = 2048); the pooled condition is
text_encoder_2's projected `text_embeds`, (B, 1280). The UNet's "text_time" addition embedding takes
`added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}`, where time_ids (B, 6) = original_size
(h, w) + crop_top_left (top, left) + target_size (h, w), as diffusers' `_get_add_time_ids` (SDXL's
micro-conditioning: the model learns what a crop and a small source image look like, and is asked at
inference for an uncropped image of the target size).

Batch keys read (`batch_time_ids`): "image" (B, 3, H, W) (its (H, W) is the target size), "original_size"
long (B, 2) (height, width) of the source image and "crop_top_left" long (B, 2) (top, left) of the crop
in the training frame (datamodules' collate). A batch without the last two (data written before they
existed) is treated as an uncropped image: original = target size, crop (0, 0), which is what SDXL is
asked for at inference; this fallback is logged once per process.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

log = logging.getLogger(__name__)

TIME_IDS = 6  # original (h, w) + crop (top, left) + target (h, w)
SIZE_KEYS = ("original_size", "crop_top_left")


@dataclass
class TextConditioning:
    """A prompt batch encoded for the UNet: `hidden` (B, L, D) is `encoder_hidden_states`; `pooled` (B, P)
    is SDXL's pooled text embedding (None on SD1.5)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def tokenize(tokenizer: Any, captions: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Token ids (B, model_max_length), padded and truncated as diffusers' pipelines do."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_prompt(captions: Sequence[str], tokenizers: Sequence[Any | None],
                  text_encoders: Sequence[nn.Module | None]) -> TextConditioning:
    """Encode `captions` with one text encoder (SD1.5: last hidden state) or two (SDXL: penultimate hidden
    states of both, concatenated, and text_encoder_2's `text_embeds` as the pooled condition). A pair that is
    (None, None) is skipped, so `(tokenizer, tokenizer_2), (text_encoder, text_encoder_2)` serves both
    architectures. Ids go to each encoder's device; call under `torch.no_grad()` for frozen encoders."""
    if len(tokenizers) != len(text_encoders):
        raise ValueError(f"encode_prompt: {len(tokenizers)} tokenizer(s) for {len(text_encoders)} text encoder(s)")
    pairs = [(t, e) for t, e in zip(tokenizers, text_encoders) if t is not None or e is not None]
    if len(pairs) not in (1, 2) or any(t is None or e is None for t, e in pairs):
        raise ValueError(f"encode_prompt takes one or two (tokenizer, text encoder) pairs, got {pairs}")
    toks: list[Any] = [t for t, _ in pairs]
    encs: list[nn.Module] = [cast(nn.Module, e) for _, e in pairs]
    if len(encs) == 1:
        (tok,), (enc,) = toks, encs
        return TextConditioning(enc(tokenize(tok, captions, _device(enc)))[0])  # (B, 77, D)
    hidden, pooled = [], None
    for tok, enc in zip(toks, encs):
        out = enc(tokenize(tok, captions, _device(enc)), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (B, 77, D_i)
        pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        raise TypeError(f"SDXL's second text encoder must return `text_embeds` (a CLIPTextModelWithProjection), "
                        f"got {type(encs[1]).__name__}")
    return TextConditioning(torch.cat(hidden, dim=-1), pooled)  # (B, 77, D_1 + D_2), (B, P)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def compute_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor,
                     target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6) float32: original (h, w), crop (top, left), target (h, w), each (B, 2)
    (a (2,) target is shared by the batch)."""
    b = original_size.shape[0]
    target_size = torch.as_tensor(target_size, device=original_size.device).expand(b, 2)
    return torch.cat([original_size, crop_top_left.to(original_size.device), target_size], dim=-1).float()


def batch_time_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    """`time_ids` (B, 6) of a loader batch from its "original_size" and "crop_top_left" (see the module
    docstring; both absent: uncropped, original = target size, crop (0, 0)), on the image's device."""
    image = batch["image"]
    b, device = image.shape[0], image.device
    target = torch.tensor(tuple(image.shape[-2:]), device=device)  # (2,) (H, W)
    present = [k for k in SIZE_KEYS if k in batch]
    if not present:
        _log_uncropped_fallback()
        return compute_time_ids(target.expand(b, 2), torch.zeros(b, 2, dtype=torch.long, device=device), target)
    if len(present) == 1:
        missing = next(k for k in SIZE_KEYS if k not in batch)
        raise KeyError(f"the batch has '{present[0]}' but no '{missing}': SDXL's time_ids need both")
    for key in SIZE_KEYS:
        if tuple(batch[key].shape) != (b, 2):
            raise ValueError(f"batch['{key}'] must be (B, 2) = ({b}, 2), got {tuple(batch[key].shape)}")
    return compute_time_ids(batch["original_size"].to(device), batch["crop_top_left"].to(device), target)


@functools.cache
def _log_uncropped_fallback() -> None:
    log.warning("SDXL: the batch has no %s; time_ids treat each image as uncropped (original size = target "
                "size, crop (0, 0))", " / ".join(SIZE_KEYS))


def added_cond_kwargs(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs` for SDXL: pooled (B, P), time_ids (B, 6)."""
    if pooled.shape[0] != time_ids.shape[0] or time_ids.shape[-1] != TIME_IDS:
        raise ValueError(f"added conditions: pooled {tuple(pooled.shape)} and time_ids {tuple(time_ids.shape)} "
                         f"must share the batch size, time_ids must be (B, {TIME_IDS})")
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device)}


def batch_added_conditions(prompt: TextConditioning, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    """`added_cond_kwargs` for a training batch: None on SD1.5 (no pooled embedding), else the pooled
    embedding and the batch's `batch_time_ids`."""
    if prompt.pooled is None:
        return None
    return added_cond_kwargs(prompt.pooled, batch_time_ids(batch))


def check_text_conditioning(unet: nn.Module, text_encoders: Sequence[nn.Module], where: str) -> None:
    """Fail at load time, naming `where` (the base model), when the text encoders cannot condition the UNet:
    the summed hidden sizes must equal its cross_attention_dim (or encoder_hid_dim), and an SDXL pair needs a
    "text_time" UNet whose addition projection takes 6 * addition_time_embed_dim + the pooled dim."""
    cfg: Any = unet.config
    hidden = [int(cast(Any, e).config.hidden_size) for e in text_encoders]
    width = cfg.encoder_hid_dim or cfg.cross_attention_dim
    if isinstance(width, int) and sum(hidden) != width:
        raise ValueError(f"{where}: the text encoder hidden size(s) {hidden} sum to {sum(hidden)}, but the UNet's "
                         f"cross_attention_dim is {width}")
    text_time = cfg.addition_embed_type == "text_time"
    if len(text_encoders) == 1:
        if text_time:
            raise ValueError(f"{where}: the UNet has SDXL's 'text_time' added conditioning but there is no "
                             "text_encoder_2/ (SDXL needs both text encoders)")
        return
    if not text_time:
        raise ValueError(f"{where}: two text encoders (SDXL) but the UNet's addition_embed_type is "
                         f"{cfg.addition_embed_type!r}, not 'text_time'")
    pooled = int(cast(Any, text_encoders[1]).config.projection_dim)
    need = TIME_IDS * int(cfg.addition_time_embed_dim) + pooled
    if cfg.projection_class_embeddings_input_dim != need:
        raise ValueError(f"{where}: the UNet's projection_class_embeddings_input_dim is "
                         f"{cfg.projection_class_embeddings_input_dim}, SDXL's conditioning gives {need} "
                         f"({TIME_IDS} x addition_time_embed_dim {cfg.addition_time_embed_dim} + pooled {pooled})")
