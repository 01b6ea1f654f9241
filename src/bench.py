"""`make bench`: training-step throughput of the tiny preset on the CPU (stage 1 and stage 2).

Measures samples/s and peak resident memory of full training steps (frozen encoders, forward,
backward, optimizer) on the embedded default, prints a table, and rewrites the section between
the markers in docs/benchmarks.md with the machine, versions and date.
On a machine with CUDA it then runs the SD1.5-scale benchmark (`src/bench_sd15.py`: random weights,
baseline LoRA loop, both stages eager and compiled, batch 64 with gradient checkpointing, inference with
0/1/2 identities against the plain pipeline) and records it too.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

BEGIN, END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml"


def _batch(world: Path, multi: bool, batch_size: int):
    from datamodules.datamodule import FaceShardDataModule

    split = "multi_seen" if multi else "single_seen"
    pattern = str(world / "data" / "heldout" / f"{split}-000000.tar")
    dm = FaceShardDataModule(train_shards=pattern, val_shards=pattern, multi_id=multi, resolution=64,
                             batch_size=batch_size, num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def optimizer_of(module) -> torch.optim.Optimizer:
    """The module's optimizer (`configure_optimizers` returns a dict when a scheduler is configured)."""
    opt = module.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


def module_step(module, batch, opt: torch.optim.Optimizer) -> Callable[[], None]:
    """One full training step of `module` on `batch` (forward, backward, optimizer step)."""
    def step() -> None:
        loss = module.shared_step(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(module, batch, steps: int, warmup: int = 2) -> float:
    """Seconds per full training step (forward, backward, optimizer step)."""
    step = module_step(module, batch, optimizer_of(module))
    module.train()
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def run(world: Path, batch_size: int, steps: int) -> list[dict]:
    from src.models.identity_encoder import FeatureCache
    from src.module import QFormerSpec, UniPortraitModule
    from src.tiny import tiny_components
    from src.train import resolve_config

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
    head = (f"Measured {dt.date.today().isoformat()} on {platform.processor() or platform.machine()} "
            f"({os.cpu_count()} cores, {gpu}; CPU run), {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"lightning {lightning.__version__}; tiny preset (configs/tiny/stage1.yaml), 64 px, fp32, "
            "full training step incl. frozen encoders; cached latents = read from the shards "
            "(`data.cached_latents`), no VAE encode; cached features = every face a hit of `model.feature_cache` "
            "(no face-backbone or CLIP forward).")
    write_section(doc, BEGIN, END, f"{head}\n\n{table(rows)}", "Tiny preset, CPU training step (`make bench`)")


def write_section(doc: Path, begin: str, end: str, body: str, heading: str) -> None:
    """Replace what lies between the `begin` / `end` markers of `doc` with `body` (or append a new
    `## heading` section with the markers); the rest of the file is kept as it is."""
    block = f"{begin}\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, default=Path("artifacts/tiny"), help="tiny world (make tiny)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--no-record", action="store_true", help="print only; do not rewrite the doc")
    a = p.parse_args(argv)
    if not (a.world / "base" / "unet").exists():
        raise SystemExit(f"no tiny world at {a.world}: run `make tiny` first")
    rows = run(a.world, a.batch_size, a.steps)
    print(table(rows))
    if not a.no_record:
        record(rows, a.doc)
        print(f"recorded in {a.doc}")
    if torch.cuda.is_available():
        from src import bench_sd15

        bench_sd15.main(["--compile", "--big-batch", "64", "--doc", str(a.doc)]
                        + (["--no-record"] if a.no_record else []))
    else:
        print("no CUDA device: the SD1.5-scale benchmark (python -m src.bench_sd15) was skipped")


if __name__ == "__main__":
    main()
