"""The benchmark's generation calls (`Job`s) and their image cache.

A job is N images of one prompt with one or two identities. Its images live under
`<out>/images/<tag>/<protocol>/<names>/` where the tag (`generation_tag`) hashes the model
(`model_fingerprint`) and every generation setting, so an interrupted run resumes (`load_job`) and a
changed setting never mixes with old images (`generate_job` writes them).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from src.evaluation import prompts as bp
from src.evaluation.identities import BenchIdentity


@dataclass(frozen=True)
class Job:
    """One generation call: N images of one prompt with one or two identities."""

    protocol: str  # "single" | "multi"
    names: tuple[str, ...]  # identity names, in prompt order
    prompt_index: int
    template: str
    prompt: str

    def folder(self, root: Path) -> Path:
        return root / self.protocol / "+".join(self.names)

    def image_path(self, root: Path, i: int) -> Path:
        return self.folder(root) / f"p{self.prompt_index:02d}_{i:02d}.png"

    def routing_path(self, root: Path) -> Path:
        return self.folder(root) / f"p{self.prompt_index:02d}.routing.safetensors"


def single_jobs(ids: Sequence[BenchIdentity], prompt_idx: Sequence[int]) -> list[Job]:
    return [Job("single", (b.name,), p, bp.SINGLE_PROMPTS[p], bp.single_prompt(bp.SINGLE_PROMPTS[p], b.class_word))
            for b in ids for p in prompt_idx]


def multi_jobs(pairs: Sequence[tuple[BenchIdentity, BenchIdentity]], prompt_idx: Sequence[int]) -> list[Job]:
    return [Job("multi", (a.name, b.name), p, bp.MULTI_PROMPTS[p],
                bp.multi_prompt(bp.MULTI_PROMPTS[p], a.class_word, b.class_word))
            for a, b in pairs for p in prompt_idx]


def generation_tag(settings: dict[str, Any]) -> str:
    """10 hex digits identifying the model and every generation setting (images are keyed under it)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def model_fingerprint(path: Path | None) -> dict[str, Any] | None:
    """Path, size and mtime of a weights file: a retrained checkpoint at the same path gets a new tag."""
    if path is None:
        return None
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_job(job: Job, root: Path, n: int) -> tuple[list[np.ndarray], list[Tensor] | None] | None:
    """Already generated images (and routing maps) of a job, or None when any is missing."""
    paths = [job.image_path(root, i) for i in range(n)]
    if not all(p.is_file() for p in paths):
        return None
    routing = None
    if job.protocol == "multi":
        rp = job.routing_path(root)
        if not rp.is_file():
            return None
        from safetensors.torch import load_file

        state = load_file(str(rp))
        routing = [state[k] for k in sorted(state)]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths], routing


def generate_job(pipe: Any, job: Job, identities: list[Any], root: Path, n: int, gen: dict[str, Any]) -> tuple[
        list[np.ndarray], list[Tensor] | None]:
    """Run the pipeline for one job, save its PNGs (and last-step routing maps), return them.

    Routing maps: one (n, 2, h, w) hard map per routed cross-attention layer.
    """
    out = pipe(job.prompt, identities, negative_prompt=gen["negative_prompt"], faceid_scale=gen["face_scale"],
               structure_scale=gen["structure_scale"], guidance_scale=gen["guidance"],
               num_inference_steps=gen["steps"], scheduler=gen["scheduler"], seed=gen["seed"], num_images=n,
               return_routing_maps=job.protocol == "multi", progress=False)
    job.folder(root).mkdir(parents=True, exist_ok=True)
    images = []
    for i, img in enumerate(out.images):
        img.save(job.image_path(root, i))
        images.append(np.asarray(img.convert("RGB")))
    routing = None
    if job.protocol == "multi":
        from safetensors.torch import save_file

        maps = out.routing_maps or []
        state = {f"{j:03d}_{m.name}": m.hard.float().contiguous() for j, m in enumerate(maps)}
        save_file(state, str(job.routing_path(root)))
        routing = [state[k] for k in sorted(state)]
    return images, routing
