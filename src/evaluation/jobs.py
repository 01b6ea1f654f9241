"""The benchmark's generation calls (`Job`s) and their image cache.

A job is N images of one prompt with one identity (single-ID) or a group of 2-4 (multi-ID). Its images
live under `<out>/images/<tag>/<folder>/<names>/` (folder: "single", "multi", or "multi-unrouted" for
groups generated without routers: every identity applied everywhere through all-ones masks), where
the tag (`generation_tag`) hashes the model (`model_fingerprint`) and every generation setting, so an
interrupted run resumes (`load_job`) and a changed setting never mixes with old images (`generate_job`
writes them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from src.evaluation import prompts as bp
from src.evaluation.identities import BenchIdentity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One generation call: N images of one prompt with one identity or a group of identities.

    unrouted: a multi-ID job generated without routers (each identity everywhere, equal weights).
    """

    protocol: str  # "single" | "multi"
    names: tuple[str, ...]  # identity names, in prompt order
    prompt_index: int  # index into SINGLE_PROMPTS, or into GROUP_PROMPTS[len(names)]
    template: str
    prompt: str
    unrouted: bool = False

    @property
    def people(self) -> int:
        return len(self.names)

    def folder(self, root: Path) -> Path:
        return root / (f"{self.protocol}-unrouted" if self.unrouted else self.protocol) / "+".join(self.names)

    def image_path(self, root: Path, i: int) -> Path:
        return self.folder(root) / f"p{self.prompt_index:02d}_{i:02d}.png"

    def routing_path(self, root: Path) -> Path:
        return self.folder(root) / f"p{self.prompt_index:02d}.routing.safetensors"


def single_jobs(ids: Sequence[BenchIdentity], prompt_idx: Sequence[int]) -> list[Job]:
    return [Job("single", (b.name,), p, bp.SINGLE_PROMPTS[p], bp.single_prompt(bp.SINGLE_PROMPTS[p], b.class_word))
            for b in ids for p in prompt_idx]


def multi_jobs(groups: Sequence[Sequence[BenchIdentity]], prompt_idx: Sequence[int], unrouted: bool = False
               ) -> list[Job]:
    """Jobs of one multi-ID split: every group x every prompt index of GROUP_PROMPTS[group size]."""
    out = []
    for group in groups:
        templates = bp.GROUP_PROMPTS[len(group)]
        for p in prompt_idx:
            out.append(Job("multi", tuple(b.name for b in group), p, templates[p],
                           bp.multi_prompt(templates[p], *(b.class_word for b in group)), unrouted))
    return out


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
    current = paths[0]
    try:
        if job.protocol == "multi":
            current = job.routing_path(root)
            if not current.is_file():
                return None
            from safetensors.torch import load_file

            state = load_file(str(current))
            routing = [state[k] for k in sorted(state)]
        images = []
        for current in paths:
            images.append(np.asarray(Image.open(current).convert("RGB")))
    except Exception as err:  # a file cut short by a kill before writes were atomic, or damaged since
        log.warning("%s: unreadable (%s); generating this job again", current, err)
        return None
    return images, routing


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write` to a temporary file renamed over `path`: a kill leaves the old file or none, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def generate_job(pipe: Any, job: Job, identities: list[Any], root: Path, n: int, gen: dict[str, Any]) -> tuple[
        list[np.ndarray], list[Tensor] | None]:
    """Run the pipeline for one job, save its PNGs (and last-step routing maps), return them.

    Routing maps: one (n, R, h, w) hard map per routed cross-attention layer; for an unrouted job one
    "explicit_masks" entry: the all-ones masks normalised over identities (1/R everywhere).
    """
    masks = None
    if job.unrouted:  # no router: every identity everywhere with equal weight (pipeline's explicit masks)
        size = pipe.pipe.unet.config.sample_size * pipe.pipe.vae_scale_factor
        masks = torch.ones(len(identities), size, size)  # (R, H, W)
    out = pipe(job.prompt, identities, negative_prompt=gen["negative_prompt"], faceid_scale=gen["face_scale"],
               structure_scale=gen["structure_scale"], guidance_scale=gen["guidance"],
               num_inference_steps=gen["steps"], scheduler=gen["scheduler"], seed=gen["seed"], num_images=n,
               masks=masks, return_routing_maps=job.protocol == "multi", progress=False)
    job.folder(root).mkdir(parents=True, exist_ok=True)
    images = []
    for i, img in enumerate(out.images):
        _write_atomic(job.image_path(root, i), lambda tmp, img=img: img.save(tmp, format="PNG"))
        images.append(np.asarray(img.convert("RGB")))
    routing = None
    if job.protocol == "multi":
        from safetensors.torch import save_file

        maps = out.routing_maps or []
        state = {f"{j:03d}_{m.name}": m.hard.float().contiguous() for j, m in enumerate(maps)}
        _write_atomic(job.routing_path(root), lambda tmp: save_file(state, str(tmp)))
        routing = [state[k] for k in sorted(state)]
    return images, routing
