"""The embedded default: a miniature, offline SD1.5 world written to disk in the real formats.

`python -m src.tiny --out artifacts/tiny` makes, deterministically from a seed:
  data/            synthetic identity shards (datamodules.synthetic), single- and multi-face
  base/            a diffusers model directory: tiny UNet, VAE, CLIP text encoder, tokenizer
                   (SD1.5's BPE, from open_clip's bundled vocabulary), SD1.5's DDPM scheduler
  clip.safetensors a tiny OpenCLIP model in open_clip's checkpoint format
  face_backbone.safetensors  a tiny IR-18 in the TFace layout
  examples/        aligned face crops of two held-out identities (for `python -m src.generate`)
Like the real parts they stand in for, the VAE, the UNet and the face backbone are *pretrained*
(briefly, on the synthetic images: reconstruction, text-conditional denoising, margin-based
identity classification) before UniPortrait training freezes them. Each step is skipped when its
output exists (delete the folder to rebuild).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from datamodules.schema import decode_sample
from datamodules.synthetic import SyntheticConfig, generate, manifest_identities, render_identity_crops
from src.conventions import uint8_to_unit
from src.models import presets
from src.models.face_backbone import IRBackbone
from src.models.face_pretrain import evaluate_verification, pretrain_recognition

log = logging.getLogger("src.tiny")


def _load_images(pattern: str, limit: int) -> tuple[torch.Tensor, list[str]]:
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
        lat = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, min(len(images), 512), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return float(loss)


def pretrain_unet(
    unet, vae, text_encoder, tokenizer, scheduler, images, captions, steps: int, batch_size: int = 32,
    lr: float = 1e-3, seed: int = 0,
) -> float:
    """Text-conditional epsilon-prediction pretraining of the whole tiny UNet (the 'SD1.5' it stands for)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, len(images), 64)])
        lat = lat * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        text = torch.cat([text_encoder(ids[i : i + 64])[0] for i in range(0, len(ids), 64)])
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    bar = tqdm(range(steps), desc="pretrain tiny UNet", leave=False)
    for _ in bar:
        idx = torch.randint(0, len(lat), (batch_size,), generator=g)
        noise = torch.randn(lat[idx].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        pred = unet(scheduler.add_noise(lat[idx], noise, t), t, encoder_hidden_states=text[idx]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return float(loss.detach())


def build_tiny_clip(seed: int):
    """A tiny OpenCLIP CLIP model (vision + text towers) in open_clip's own class."""
    import open_clip

    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(**presets.TINY_CLIP_VISION)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=presets.TINY_CLIP_EMBED_DIM, vision_cfg=vision, text_cfg=text)


def tiny_components(root: Path) -> presets.ComponentPaths:
    """The ComponentPaths of the embedded default under `root` (what configs/tiny/*.yaml point at)."""
    return presets.ComponentPaths(
        base_model=str(root / "base"),
        clip_checkpoint=str(root / "clip.safetensors"),
        face_backbone=str(root / "face_backbone.safetensors"),
        clip_vision_config=dict(presets.TINY_CLIP_VISION),
        clip_embed_dim=presets.TINY_CLIP_EMBED_DIM,
        face_num_layers=18,
        face_widths=presets.TINY_FACE_WIDTHS,
        face_embedding_size=presets.TINY_FACE_EMBEDDING,
    )


def build(out: Path, seed: int = 0, data: SyntheticConfig | None = None, vae_steps: int = 600,
          unet_steps: int = 400, face_steps: int = 120, pretrain_images: int = 2000,
          face_pooled_weight: float = 0.0, workers: int = 1) -> dict:
    """Write the world under `out` (each step skipped when its output exists); returns tiny_report.json's dict.

    `workers` processes render the synthetic images (the same bytes whatever the count); the pretraining
    runs in this process on torch's threads.
    """
    out.mkdir(parents=True, exist_ok=True)
    report_file = out / "tiny_report.json"
    # Steps whose output exists are skipped: keep what the runs that made them reported.
    report: dict = json.loads(report_file.read_text()) if report_file.is_file() else {}
    report["seed"] = seed
    t0 = time.time()
    data_dir = out / "data"
    if not (data_dir / "manifest.json").exists():
        cfg = data or SyntheticConfig(seed=seed, workers=workers)
        generate(data_dir, cfg)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    report["data"] = manifest["counts"]

    face_path = out / "face_backbone.safetensors"
    if not face_path.exists():
        torch.manual_seed(seed)
        face = IRBackbone(18, presets.TINY_FACE_WIDTHS, presets.TINY_FACE_EMBEDDING)
        train_ids = list(range(len(manifest["identities"]["train"])))
        crops, labels = render_identity_crops(train_ids, n_per_id=24, seed=seed + 1, workers=workers)
        held, held_labels = render_identity_crops(train_ids, n_per_id=4, seed=seed + 2, workers=workers)
        x = uint8_to_unit(crops)
        held_x, held_y = uint8_to_unit(held), torch.as_tensor(held_labels)
        before = evaluate_verification(face, held_x, held_y)
        pooled_before = evaluate_verification(face, held_x, held_y, pooled=True)
        stats = pretrain_recognition(face, x, torch.as_tensor(labels), steps=face_steps, seed=seed,
                                     pooled_weight=face_pooled_weight)
        after = evaluate_verification(face, held_x, held_y)
        pooled_after = evaluate_verification(face, held_x, held_y, pooled=True)
        save_file({k: v.contiguous() for k, v in face.state_dict().items()}, str(face_path))
        report["face_backbone"] = {"new_render_accuracy_before": before, "after": after,
                                   "pooled_map_accuracy_before": pooled_before, "pooled_map_after": pooled_after,
                                   **stats}
        log.info("tiny face backbone: identification accuracy on new renders %.3f -> %.3f "
                 "(embedding), %.3f -> %.3f (spatial mean of F_r)", before, after, pooled_before, pooled_after)

    clip_path = out / "clip.safetensors"
    if not clip_path.exists():
        clip = build_tiny_clip(seed)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_path))

    base = out / "base"
    if not (base / "unet").exists():
        torch.manual_seed(seed)
        images, captions = _load_images(manifest["splits"]["single_train"]["path_pattern"], pretrain_images)
        tokenizer = presets.write_clip_tokenizer(base / "tokenizer")
        text_encoder = presets.tiny_text_encoder().eval().requires_grad_(False)
        scheduler = presets.sd15_scheduler()
        vae = presets.tiny_vae()
        report["vae_loss"] = pretrain_vae(vae, images, vae_steps, seed=seed)
        vae.requires_grad_(False)
        unet = presets.tiny_unet(sample_size=images.shape[-1] // 4)
        report["unet_loss"] = pretrain_unet(unet, vae, text_encoder, tokenizer, scheduler, images, captions,
                                            unet_steps, seed=seed)
        vae.save_pretrained(base / "vae")
        text_encoder.save_pretrained(base / "text_encoder")
        scheduler.save_pretrained(base / "scheduler")
        unet.save_pretrained(base / "unet")  # last: its presence marks the base model complete
    examples = out / "examples"
    if not examples.exists():
        # aligned crops of two held-out (unseen) identities, for the README's generate example
        ids = manifest_identities(manifest, "unseen")[:2]
        crops, _ = render_identity_crops(ids, n_per_id=1, seed=seed + 3)
        examples.mkdir()
        for label, crop in zip(("person_a", "person_b"), crops):
            Image.fromarray(crop).save(examples / f"{label}.png")
    report["seconds"] = round(time.time() - t0, 1)  # this call's time (steps already done are skipped)
    report_file.write_text(json.dumps(report, indent=2, default=str))
    return report


@torch.no_grad()
def measure_quality(root: Path, images: int = 200, timesteps: int = 8, seed: int = 0) -> dict:
    """Held-out quality of the pretrained parts of the world at `root` (what a change to `build` must keep).

    On the first `images` images of the single_seen and single_unseen splits (never trained on):
    the VAE's reconstruction MSE (posterior mode, pixels in [-1, 1]); the UNet's epsilon-prediction MSE
    with the images' captions, averaged over `timesteps` evenly spaced t in [0, 1000) with noise drawn
    from `seed` (the same noise for every world, so two worlds are compared on the same draws); and the
    face backbone's leave-one-out nearest-centroid identification accuracy on new renders of the 64
    training identities (4 each, the draws `build` reports as "after") and of the 16 unseen ones (8 each).
    """
    comps = tiny_components(root).build()
    vae, unet, text_encoder, tokenizer, scheduler = (comps.vae, comps.unet, comps.text_encoder, comps.tokenizer,
                                                     comps.scheduler)
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    out: dict = {"images": images, "timesteps": timesteps, "seed": seed}
    ts = torch.linspace(0, scheduler.config.num_train_timesteps - 1, timesteps + 2)[1:-1].round().long()
    for split in ("single_seen", "single_unseen"):
        x, captions = _load_images(manifest["splits"][split]["path_pattern"], images)  # (N, 3, H, W)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        g = torch.Generator().manual_seed(seed)
        rec_err, eps_err = [], []
        for i in range(0, len(x), 50):
            xb = x[i : i + 50]
            lat = vae.encode(xb).latent_dist.mode()  # (b, 4, H/4, W/4)
            rec_err.append(F.mse_loss(vae.decode(lat).sample, xb, reduction="none").mean((1, 2, 3)))
            lat = lat * vae.config.scaling_factor
            text = text_encoder(ids[i : i + 50])[0]
            for t in ts:
                noise = torch.randn(lat.shape, generator=g)
                tt = t.repeat(len(lat))
                pred = unet(scheduler.add_noise(lat, noise, tt), tt, encoder_hidden_states=text).sample
                eps_err.append(F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3)))
        out[f"vae_mse_{split}"] = float(torch.cat(rec_err).mean())
        out[f"unet_eps_mse_{split}"] = float(torch.cat(eps_err).mean())
    face = comps.face
    for name, split, n, s in (("seen", "train", 4, seed + 2), ("unseen", "unseen", 8, seed + 4)):
        crops, labels = render_identity_crops(manifest_identities(manifest, split), n_per_id=n, seed=s)
        out[f"face_accuracy_{name}"] = evaluate_verification(face, uint8_to_unit(crops), torch.as_tensor(labels))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("artifacts/tiny"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--unet-steps", type=int, default=400)
    p.add_argument("--face-steps", type=int, default=120)
    p.add_argument("--face-pooled-weight", type=float, default=0.0,
                   help="weight of a second face-backbone margin loss on the spatial mean of its last map "
                        "(0: off, the default; see src.models.face_pretrain.pooled_features)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes rendering the synthetic images (default: one per core; the same bytes)")
    p.add_argument("--quality", action="store_true",
                   help="build nothing: print the held-out quality of the world at --out (measure_quality)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quality:
        print(json.dumps(measure_quality(a.out), indent=2))
        return
    report = build(a.out, seed=a.seed, vae_steps=a.vae_steps, unet_steps=a.unet_steps, face_steps=a.face_steps,
                   face_pooled_weight=a.face_pooled_weight, workers=a.workers)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
