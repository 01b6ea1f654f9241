"""The default world's pretrained parts shipped in assets/tiny: which files, whether they match a build's
options (manifest.json), and writing them (`make tiny-assets`). The tiny SDXL world's UNet ships the same way
in assets/tiny-sdxl (`src.tiny.sdxl`, `make tiny-sdxl-assets`)."""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The default world's pretrained parts, shipped in the repository, and the files that make them up
# (paths relative to both the assets folder and the world's folder). The UNet comes last among the
# base/ files: its folder's presence marks the base model complete.
ASSETS = Path(__file__).resolve().parents[2] / "assets" / "tiny"
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
# Data options that change how the world is made, not what: left out of the options shipped weights must match.
DISPLAY_ONLY = ("progress", "workers")
REPORT = "tiny_report.json"  # a world's build report: where its pretrained parts came from, their figures


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pretrain_options(seed: int, data_options: dict, vae_steps: int, unet_steps: int, face_steps: int,
                     pretrain_images: int, face_pooled_weight: float) -> dict:
    """Everything the pretrained parts depend on besides the code: what shipped weights must match."""
    data = {k: v for k, v in data_options.items() if k not in DISPLAY_ONLY}
    return {"seed": seed, "data": data, "vae_steps": vae_steps, "unet_steps": unet_steps,
            "face_steps": face_steps, "pretrain_images": pretrain_images, "face_pooled_weight": face_pooled_weight}


def shipped_weights(assets: Path | None, options: dict, files: tuple[str, ...] = PRETRAINED_FILES) -> dict | None:
    """The manifest of the pretrained weights at `assets` when they were made with `options`, else None
    (logged). Raises ValueError naming the file when one of `files` is not the one the manifest records."""
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
    for rel in files:
        want = manifest["sha256"].get(rel)
        path = assets / rel
        if not path.is_file():
            raise ValueError(f"{path}: missing, but {manifest_file} lists it; restore it (git checkout -- {path}) "
                             "or remake the assets (make tiny-assets)")
        if sha256(path) != want:
            raise ValueError(f"{path}: sha256 differs from the one {manifest_file} records ({want}); restore it "
                             f"(git checkout -- {path}) or remake the assets (make tiny-assets)")
    return manifest


def warn_if_companions_differ(manifest: dict, out: Path, remake: str) -> None:
    """Warn, naming the file, for each of the shipped manifest's `companions` (the random text encoders the
    weights were pretrained against, drawn from the seed here) that differs in the world at `out`: this CPU
    draws other random floats. `remake` is the command that pretrains here instead."""
    for rel, want in manifest.get("companions", {}).items():
        if sha256(out / rel) != want:
            log.warning("%s differs from the text encoder the shipped weights were pretrained with (this CPU "
                        "draws other random floats); figures may differ from docs/benchmarks.md; `%s` pretrains "
                        "them here", out / rel, remake)


def write_report(world: Path, report: dict) -> Path:
    """Write the world's tiny_report.json atomically, under a per-process temporary name: make runs a world's
    build as a no-op prerequisite of jobs side by side (`make -j3` in CI). Returns its path."""
    path = world / REPORT
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)
    return path


def copy_shipped(assets: Path, out: Path, files: tuple[str, ...]) -> None:
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(assets / rel, out / rel)


def save_assets(world: Path, assets: Path, command: str, files: tuple[str, ...] = PRETRAINED_FILES,
                companions: tuple[str, ...] = (TEXT_ENCODER_FILE,),
                figures: tuple[str, ...] = ("face_backbone", "vae_loss", "unet_loss")) -> dict:
    """Write the pretrained parts (`files`) of the world at `world` (built with pretraining) to `assets`
    with manifest.json: the options they were made with, each file's sha256 (and the sha256 of the
    `companions` they were pretrained against), their pretraining `figures` from the world's
    tiny_report.json, and the date, commit, machine and versions that made them. Returns the manifest."""
    report = json.loads((world / REPORT).read_text())
    if report.get("pretrained", {}).get("source") != "pretrained here":
        raise ValueError(f"{world / REPORT}: its pretrained parts were not pretrained in this folder "
                         f"(pretrained: {report.get('pretrained')}); build a fresh folder with --pretrain")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    manifest = {
        "options": report["pretrained"]["options"],
        "sha256": {rel: sha256(world / rel) for rel in files},
        "companions": {rel: sha256(world / rel) for rel in companions},
        "report": {k: report[k] for k in figures},
        "made": {"date": datetime.date.today().isoformat(), "commit": commit, "command": command,
                 "cpu": cpu_name(), "torch": torch.__version__, "seconds": report["pretrained"].get("seconds")},
    }
    if assets.exists():
        shutil.rmtree(assets)
    copy_shipped(world, assets, files)
    (assets / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote the pretrained tiny parts of %s to %s", world, assets)
    return manifest


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
