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

Pretraining those three parts takes ~13 min on a 2-core CPU, so the default world's pretrained weights
ship in the repository (assets/tiny: the UNet and VAE directories, the face backbone, and manifest.json
with the options they were made with, their sha256 and how they were made). A build whose options are
the manifest's copies them instead of pretraining (the same bytes `--pretrain` gives on the machine the
manifest names); any other build (another seed, data size or step count) pretrains here and logs why.
`make tiny-assets` remakes them: `--pretrain --save-assets assets/tiny` on a fresh folder.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

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

# The default world's pretrained parts, shipped in the repository, and the files that make them up
# (paths relative to both the assets folder and the world's folder). The UNet comes last among the
# base/ files: its folder's presence marks the base model complete.
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny"
PRETRAINED_FILES = (
    "face_backbone.safetensors",
    "base/vae/config.json",
    "base/vae/diffusion_pytorch_model.safetensors",
    "base/unet/config.json",
    "base/unet/diffusion_pytorch_model.safetensors",
)
# Built here from the seed, not shipped, but the UNet was pretrained against it: its hash is recorded so a
# machine whose floats draw a different random text encoder says so.
TEXT_ENCODER_FILE = "base/text_encoder/model.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pretrain_options(seed: int, data_options: dict, vae_steps: int, unet_steps: int, face_steps: int,
                     pretrain_images: int, face_pooled_weight: float) -> dict:
    """Everything the pretrained parts depend on besides the code: what shipped weights must match."""
    data = {k: v for k, v in data_options.items() if k not in ("progress", "workers")}  # display / speed only
    return {"seed": seed, "data": data, "vae_steps": vae_steps, "unet_steps": unet_steps,
            "face_steps": face_steps, "pretrain_images": pretrain_images, "face_pooled_weight": face_pooled_weight}


def shipped_weights(assets: Path | None, options: dict) -> dict | None:
    """The manifest of the pretrained weights at `assets` when they were made with `options`, else None
    (logged). Raises ValueError naming the file when a shipped file is not the one the manifest records."""
    if assets is None:
        return None
    manifest_file = assets / "manifest.json"
    if not manifest_file.is_file():
        log.info("no shipped pretrained weights at %s: pretraining the tiny parts here", manifest_file)
        return None
    manifest = json.loads(manifest_file.read_text())
    made_with = manifest.get("options", {})
    if made_with != options:
        differ = sorted(k for k in set(made_with) | set(options) if made_with.get(k) != options.get(k))
        log.info("the shipped weights at %s were made with other options (%s: %s there, %s here): "
                 "pretraining the tiny parts here", assets, ", ".join(differ),
                 {k: made_with.get(k) for k in differ}, {k: options.get(k) for k in differ})
        return None
    for rel in PRETRAINED_FILES:
        want = manifest["sha256"].get(rel)
        path = assets / rel
        if not path.is_file():
            raise ValueError(f"{path}: missing, but {manifest_file} lists it; restore it (git checkout -- {path}) "
                             "or remake the assets (make tiny-assets)")
        if _sha256(path) != want:
            raise ValueError(f"{path}: sha256 differs from the one {manifest_file} records ({want}); restore it "
                             f"(git checkout -- {path}) or remake the assets (make tiny-assets)")
    return manifest


def _copy_shipped(assets: Path, out: Path, files: tuple[str, ...]) -> None:
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(assets / rel, out / rel)


def save_assets(world: Path, assets: Path, command: str) -> dict:
    """Write the pretrained parts of the world at `world` (built by `build(..., pretrain=True)`) to `assets`
    with manifest.json: the options they were made with, each file's sha256, their pretraining figures, and
    the date, commit, machine and versions that made them. Returns the manifest."""
    report = json.loads((world / "tiny_report.json").read_text())
    if report.get("pretrained", {}).get("source") != "pretrained here":
        raise ValueError(f"{world / 'tiny_report.json'}: its pretrained parts were not pretrained in this folder "
                         f"(pretrained: {report.get('pretrained')}); build a fresh folder with --pretrain")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    manifest = {
        "options": report["pretrained"]["options"],
        "sha256": {rel: _sha256(world / rel) for rel in PRETRAINED_FILES},
        "companions": {TEXT_ENCODER_FILE: _sha256(world / TEXT_ENCODER_FILE)},
        "report": {k: report[k] for k in ("face_backbone", "vae_loss", "unet_loss")},
        "made": {"date": datetime.date.today().isoformat(), "commit": commit, "command": command,
                 "cpu": _cpu_name(), "torch": torch.__version__, "seconds": report["pretrained"].get("seconds")},
    }
    if assets.exists():
        shutil.rmtree(assets)
    _copy_shipped(world, assets, PRETRAINED_FILES)
    (assets / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote the pretrained tiny parts of %s to %s", world, assets)
    return manifest


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        lat = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode()
                         for i in range(0, min(len(images), 512), 64)])
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
          face_pooled_weight: float = 0.0, workers: int = 1, pretrain: bool = False,
          assets: Path | None = ASSETS) -> dict:
    """Write the world under `out` (each step skipped when its output exists); returns tiny_report.json's dict.

    `workers` processes render the synthetic images (the same bytes whatever the count). The UNet, VAE and
    face backbone are copied from `assets` when its manifest was made with this call's options, else (or
    with `pretrain`) pretrained in this process on torch's threads.
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
        _copy_shipped(assets, out, ("face_backbone.safetensors",))
        report["face_backbone"] = shipped["report"]["face_backbone"]
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
        torch.manual_seed(seed)  # the text encoder's random weights come from the seed, shipped or not
        tokenizer = presets.write_clip_tokenizer(base / "tokenizer")
        text_encoder = presets.tiny_text_encoder().eval().requires_grad_(False)
        scheduler = presets.sd15_scheduler()
        text_encoder.save_pretrained(base / "text_encoder")
        scheduler.save_pretrained(base / "scheduler")
        if shipped:
            want = shipped.get("companions", {}).get(TEXT_ENCODER_FILE)
            if want and _sha256(out / TEXT_ENCODER_FILE) != want:
                log.warning("%s differs from the text encoder the shipped UNet was pretrained with (this CPU "
                            "draws other random floats); figures may differ from docs/benchmarks.md; "
                            "`make tiny PRETRAIN=1` pretrains the parts here", out / TEXT_ENCODER_FILE)
            report["vae_loss"], report["unet_loss"] = shipped["report"]["vae_loss"], shipped["report"]["unet_loss"]
            _copy_shipped(assets, out, tuple(f for f in PRETRAINED_FILES if f.startswith("base/")))  # UNet last
        else:
            images, captions = _load_images(manifest["splits"]["single_train"]["path_pattern"], pretrain_images)
            vae = presets.tiny_vae()
            report["vae_loss"] = pretrain_vae(vae, images, vae_steps, seed=seed)
            vae.requires_grad_(False)
            unet = presets.tiny_unet(sample_size=images.shape[-1] // 4)
            report["unet_loss"] = pretrain_unet(unet, vae, text_encoder, tokenizer, scheduler, images, captions,
                                                unet_steps, seed=seed)
            vae.save_pretrained(base / "vae")
            unet.save_pretrained(base / "unet")  # last: its presence marks the base model complete
    if todo:
        report["pretrained"]["seconds"] = round(time.time() - t_pretrain, 1)
    examples = out / "examples"
    if not examples.exists():
        # aligned crops of two held-out (unseen) identities, for the README's generate example
        ids = manifest_identities(manifest, "unseen")[:2]
        crops, _ = render_identity_crops(ids, n_per_id=1, seed=seed + 3)
        examples.mkdir()
        for label, crop in zip(("person_a", "person_b"), crops):
            Image.fromarray(crop).save(examples / f"{label}.png")
    report["seconds"] = round(time.time() - t0, 1)  # this call's time (steps already done are skipped)
    # atomically: make runs this as a no-op prerequisite of jobs side by side (`make -j3` in CI)
    tmp = report_file.with_name(f".{report_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, report_file)
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
    p.add_argument("--pretrain", action="store_true",
                   help="pretrain the UNet, VAE and face backbone here (~13 min on 2 cores) instead of copying "
                        "the shipped weights of --assets")
    p.add_argument("--assets", type=Path, default=ASSETS,
                   help="shipped pretrained weights, used when their manifest.json was made with these options "
                        "(default: %(default)s)")
    p.add_argument("--save-assets", type=Path, default=None, metavar="DIR",
                   help="after building with --pretrain, write the pretrained parts and their manifest to DIR "
                        "(what `make tiny-assets` does for assets/tiny)")
    a = p.parse_args(argv)
    if a.save_assets and not a.pretrain:
        p.error("--save-assets needs --pretrain (only weights pretrained here can be shipped)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quality:
        print(json.dumps(measure_quality(a.out), indent=2))
        return
    report = build(a.out, seed=a.seed, vae_steps=a.vae_steps, unet_steps=a.unet_steps, face_steps=a.face_steps,
                   face_pooled_weight=a.face_pooled_weight, workers=a.workers, pretrain=a.pretrain,
                   assets=a.assets)
    print(json.dumps(report, indent=2, default=str))
    if a.save_assets:
        command = "python -m src.tiny " + " ".join(argv if argv is not None else sys.argv[1:])
        save_assets(a.out, a.save_assets, command)


if __name__ == "__main__":
    main()
