"""Building the embedded default's world on disk (`build`) and measuring its pretrained parts (`measure_quality`).

`build(out)` writes, deterministically from a seed: data/ (synthetic identity shards), base/ (a diffusers
model directory), clip.safetensors, face_backbone.safetensors and examples/; each step is skipped when its
output exists. See the package docstring (`src.tiny`) for what each part is.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from datamodules.synthetic.canonical import FaceCache
from datamodules.synthetic.dataset import SyntheticConfig, generate, render_identity_crops
from datamodules.synthetic.identities import manifest_identities
from src.conventions import uint8_to_unit
from src.models import presets
from src.models.face_backbone import IRBackbone
from src.tiny.architectures import (
    TINY_FACE_EMBEDDING,
    TINY_FACE_WIDTHS,
    build_tiny_clip,
    tiny_components,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
)
from src.tiny.assets import (
    ASSETS,
    PRETRAINED_FILES,
    REPORT,
    copy_shipped,
    pretrain_options,
    shipped_weights,
    warn_if_companions_differ,
    write_report,
)
from src.tiny.face_pretrain import evaluate_verification, pretrain_recognition
from src.tiny.pretrain import load_images, pretrain_unet, pretrain_vae

log = logging.getLogger(__name__)


def build(out: Path, seed: int = 0, data: SyntheticConfig | None = None, vae_steps: int = 600,
          unet_steps: int = 400, face_steps: int = 120, pretrain_images: int = 2000,
          face_pooled_weight: float = 0.0, workers: int = 1, pretrain: bool = False,
          assets: Path | None = ASSETS) -> dict:
    """Write the world under `out` (each step skipped when its output exists); returns tiny_report.json's dict.

    `workers` processes render the synthetic images (the same bytes whatever the count). The UNet, VAE and
    face backbone are copied from `assets` when its manifest was made with this call's options, else (or
    with `pretrain`) pretrained in this process on torch's threads.
    """
    out.mkdir(parents=True, exist_ok=True)
    report_file = out / REPORT
    # Steps whose output exists are skipped: keep what the runs that made them reported.
    report: dict = json.loads(report_file.read_text()) if report_file.is_file() else {}
    report["seed"] = seed
    t0 = time.time()
    data_dir = out / "data"
    faces = FaceCache()  # canonical renders, drawn once for the data, the face crops and the examples
    if not (data_dir / "manifest.json").exists():
        cfg = data or SyntheticConfig(seed=seed, workers=workers)
        generate(data_dir, cfg, faces)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    report["data"] = manifest["counts"]

    options = pretrain_options(seed, manifest["options"], vae_steps, unet_steps, face_steps, pretrain_images,
                               face_pooled_weight)
    face_path = out / "face_backbone.safetensors"
    todo = not face_path.exists() or not (out / "base" / "unet").exists()
    shipped = shipped_weights(assets, options) if todo and not pretrain else None
    if todo:
        report["pretrained"] = ({"source": str(assets), "made": shipped["made"]} if shipped else
                                {"source": "pretrained here", "options": options})
    t_pretrain = time.time()
    if shipped and not face_path.exists():
        copy_shipped(assets, out, ("face_backbone.safetensors",))
        report["face_backbone"] = shipped["report"]["face_backbone"]
    if not face_path.exists():
        torch.manual_seed(seed)
        face = IRBackbone(18, TINY_FACE_WIDTHS, TINY_FACE_EMBEDDING)
        train_ids = list(range(len(manifest["identities"]["train"])))
        crops, labels = render_identity_crops(train_ids, n_per_id=24, seed=seed + 1, workers=workers, cache=faces)
        held, held_labels = render_identity_crops(train_ids, n_per_id=4, seed=seed + 2, workers=workers,
                                                  cache=faces)
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
        torch.manual_seed(seed)  # the text encoder's random weights come from the seed, shipped or not
        tokenizer = presets.write_clip_tokenizer(base / "tokenizer")
        text_encoder = tiny_text_encoder().eval().requires_grad_(False)
        scheduler = presets.sd15_scheduler()
        text_encoder.save_pretrained(base / "text_encoder")
        scheduler.save_pretrained(base / "scheduler")
        if shipped:
            warn_if_companions_differ(shipped, out, "make tiny PRETRAIN=1")
            report["vae_loss"], report["unet_loss"] = shipped["report"]["vae_loss"], shipped["report"]["unet_loss"]
            copy_shipped(assets, out, tuple(f for f in PRETRAINED_FILES if f.startswith("base/")))  # UNet last
        else:
            images, captions = load_images(manifest["splits"]["single_train"]["path_pattern"], pretrain_images)
            vae = tiny_vae()
            report["vae_loss"] = pretrain_vae(vae, images, vae_steps, seed=seed)
            vae.requires_grad_(False)
            unet = tiny_unet(sample_size=images.shape[-1] // 4)
            report["unet_loss"] = pretrain_unet(unet, vae, (tokenizer,), (text_encoder,), scheduler, images,
                                                captions, unet_steps, seed=seed)
            vae.save_pretrained(base / "vae")
            unet.save_pretrained(base / "unet")  # last: its presence marks the base model complete
    if todo:
        report["pretrained"]["seconds"] = round(time.time() - t_pretrain, 1)
    examples = out / "examples"
    if not examples.exists():
        # aligned crops of two held-out (unseen) identities, for the README's generate example
        ids = manifest_identities(manifest, "unseen")[:2]
        crops, _ = render_identity_crops(ids, n_per_id=1, seed=seed + 3, cache=faces)
        examples.mkdir()
        for label, crop in zip(("person_a", "person_b"), crops):
            Image.fromarray(crop).save(examples / f"{label}.png")
    report["seconds"] = round(time.time() - t0, 1)  # this call's time (steps already done are skipped)
    write_report(out, report)
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
        x, captions = load_images(manifest["splits"][split]["path_pattern"], images)  # (N, 3, H, W)
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
