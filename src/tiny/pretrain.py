"""Pretraining of the tiny VAE and UNet on the synthetic images (the face backbone's: `face_pretrain`).

Like the real parts they stand in for, these come pretrained before UniPortrait training freezes them:
the VAE on reconstruction, the UNet on text-conditional denoising.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import webdataset as wds
from tqdm import tqdm

from datamodules.schema import decode_sample
from src.conventions import uint8_to_unit
from src.models.conditioning import added_cond_kwargs, compute_time_ids, encode_prompt


def load_images(pattern: str, limit: int) -> tuple[torch.Tensor, list[str]]:
    """First `limit` images (N, 3, H, W) in [-1, 1] and captions of a shard pattern."""
    images, captions = [], []
    for raw in wds.WebDataset(pattern, shardshuffle=False, empty_check=False):
        s = decode_sample(raw)
        images.append(uint8_to_unit(s.image))
        captions.append(s.caption)
        if len(images) >= limit:
            break
    return torch.stack(images), captions


def pretrain_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> float:
    """Reconstruction + small KL pretraining (5% warm-up, cosine decay); sets scaling_factor so latents
    have unit std. The identities' fine patterns must survive the VAE for the identity pathway to matter:
    measured here on held-out renders, reconstruction MSE 0.056 after 200 constant-lr steps (patterns and
    skin colours lost), 0.029 after 600 steps with a warm-up + cosine schedule."""
    from src.schedules import WarmupCosine

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = WarmupCosine(opt, total_steps=max(steps, 1), warmup_steps=steps // 20)
    vae.train()
    bar = tqdm(range(steps), desc="pretrain tiny VAE", leave=False)
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    loss = loss.detach()
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode()
                         for i in range(0, min(len(images), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return float(loss)


def pretrain_unet(
    unet, vae, tokenizers, text_encoders, scheduler, images, captions, steps: int, batch_size: int = 32,
    lr: float = 1e-3, seed: int = 0,
) -> float:
    """Text-conditional epsilon-prediction pretraining of the whole tiny UNet (the base model it stands for).

    `tokenizers` / `text_encoders`: one pair (SD1.5: the last hidden state conditions the UNet) or two
    (SDXL: penultimate hidden states concatenated, text_encoder_2's pooled embedding and uncropped
    `time_ids` as the added conditions), encoded as training encodes them (`src.models.conditioning`).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
        lat = lat * vae.config.scaling_factor  # (N, 4, H/f, W/f)
        prompts = [encode_prompt(captions[i : i + 64], tokenizers, text_encoders) for i in range(0, len(captions), 64)]
        text = torch.cat([p.hidden for p in prompts])  # (N, 77, D)
        pooled = None if prompts[0].pooled is None else torch.cat([p.pooled for p in prompts])  # (N, P) on SDXL
    target = torch.tensor(tuple(images.shape[-2:]))  # (2,) the renders are uncropped: original = target size
    time_ids = compute_time_ids(target.expand(batch_size, 2), torch.zeros(batch_size, 2, dtype=torch.long), target)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    bar = tqdm(range(steps), desc="pretrain tiny UNet", leave=False)
    for _ in bar:
        idx = torch.randint(0, len(lat), (batch_size,), generator=g)
        noise = torch.randn(lat[idx].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        added = None if pooled is None else added_cond_kwargs(pooled[idx], time_ids)
        pred = unet(scheduler.add_noise(lat[idx], noise, t), t, encoder_hidden_states=text[idx],
                    added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return float(loss.detach())
