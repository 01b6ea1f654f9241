"""Training-step throughput of the tiny preset on the CPU, stage 1 and stage 2 (`make bench`).

Measures samples/s and peak resident memory of full training steps (frozen encoders, forward,
backward, optimizer) on the embedded default, prints a table, and rewrites the section between
the markers in docs/benchmarks.md with the machine, versions and date.
On a machine with CUDA `make bench` then runs the SD1.5-scale benchmark (`src.benchmarks.sd15`: random weights,
baseline LoRA loop, both stages eager and compiled, batch 64 with gradient checkpointing, inference with
0/1/2 identities against the plain pipeline) and records it too.
"""
from __future__ import annotations

import datetime as dt
import os
import resource
from pathlib import Path

import torch

from src.benchmarks.steps import time_steps, write_section
from src.tiny.assets import cpu_name

BEGIN, END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "stage1.yaml"


def _batch(world: Path, multi: bool, batch_size: int):
    from datamodules.datamodule import FaceShardDataModule

    split = "multi_seen" if multi else "single_seen"
    pattern = str(world / "data" / "heldout" / f"{split}-000000.tar")
    dm = FaceShardDataModule(train_shards=pattern, val_shards=pattern, multi_id=multi, resolution=64,
                             batch_size=batch_size, num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def run(world: Path, batch_size: int, steps: int) -> list[dict]:
    from src.config import resolve_config
    from src.models.id_embedding import QFormerSpec
    from src.models.identity_encoder import FeatureCache
    from src.module import UniPortraitModule
    from src.tiny import tiny_components

    cfg = resolve_config(TINY_CONFIG)["model"]
    rows = []
    for stage in (1, 2):
        torch.manual_seed(0)
        module = UniPortraitModule(
            components=tiny_components(world), stage=stage, lora_rank=cfg["lora_rank"],
            qformer=QFormerSpec(**cfg["qformer"]),
        )
        batch = _batch(world, multi=stage == 2, batch_size=batch_size)
        # the same batch as `data.cached_latents=true` delivers it (datamodules/latent_cache.py)
        cached = dict(batch, latents=module.encode_images(batch["image"]),
                      latent_scaling=torch.full((batch_size,), float(module.vae.config.scaling_factor),
                                                dtype=torch.float64))
        for latents, features, b in (("encoded", "computed", batch), ("cached", "computed", cached),
                                     ("cached", "cached", cached)):
            # `model.feature_cache`: after the warm-up steps every face of this fixed batch is a cache hit
            module.identity.cache = FeatureCache(10_000) if features == "cached" else None
            sec = time_steps(module, b, steps)
            rows.append({
                "stage": stage, "latents": latents, "features": features, "batch": batch_size, "step_s": sec,
                "samples_per_s": batch_size / sec,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                "faces": float(batch["face_valid"].sum(1).float().mean()),
            })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | VAE latents | face/CLIP features | batch | faces/image | step (s) | "
             "samples/s | peak RSS (GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['latents']} | {r['features']} | {r['batch']} | {r['faces']:.2f} | "
                     f"{r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def record(rows: list[dict], doc: Path) -> None:
    import diffusers
    import lightning

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    head = (f"Measured {dt.date.today().isoformat()} on {cpu_name()} "
            f"({os.cpu_count()} cores, {gpu}; CPU run), {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"lightning {lightning.__version__}; tiny preset (configs/tiny/stage1.yaml), 64 px, fp32, "
            "full training step incl. frozen encoders; cached latents = read from the shards "
            "(`data.cached_latents`), no VAE encode; cached features = every face a hit of `model.feature_cache` "
            "(no face-backbone or CLIP forward).")
    write_section(doc, BEGIN, END, f"{head}\n\n{table(rows)}", "Tiny preset, CPU training step (`make bench`)")
