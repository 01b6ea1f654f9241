"""The identity-preservation benchmark's run (`make eval`, `python -m src.evaluate`; options in
src/cli/evaluate.py): load the model, the recogniser and the identities, plan the single-ID jobs and the
multi-ID splits (2, 3, 4 people; unrouted when the model has no routers), generate or reuse every job's
images, score them, write results.json / results.md / results.png and each split's pictures.

build_metric_recognizer  the Face Sim recogniser: the synthetic world's own, or dlib / FaceNet
build_clip               CLIP-T / CLIP-I: a local open_clip checkpoint, or the tiny world's CLIP
build_fid_feature        the FID feature network (local weights only)
multi_unrouted           whether the multi-ID splits run without routers (--multi-mode)
plan_splits              the multi-ID splits' groups, prompts and jobs
run                      the whole benchmark
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from tqdm import tqdm

from src.evaluation import prompts as bp
from src.evaluation.figures import identity_colours, write_contact_sheet, write_plot, write_split_plot
from src.evaluation.identities import BenchIdentity, real_identities, reference_photos, synthetic_identities
from src.evaluation.jobs import Job, generate_job, generation_tag, load_job, model_fingerprint, multi_jobs, single_jobs
from src.evaluation.multi_scoring import ROUTED_LABEL, UNROUTED_LABEL, SplitScores
from src.evaluation.reports import RECOGNIZER_NOTE, source_label, write_markdown
from src.evaluation.scoring import ProtocolScores, compute_fid
from src.evaluation.synthetic_recognizer import SyntheticFaceRecognizer
from src.inference.loading import load_pipeline
from src.inference.pipeline import UniPortraitPipeline
from src.metrics import ClipScore
from src.models import adapters
from src.recognizers import FaceRecognizer, build_recognizer


def build_metric_recognizer(a: argparse.Namespace, comps: Any, manifest: dict | None, size: int) -> FaceRecognizer:
    if a.recognizer != "tiny":
        return build_recognizer(a.recognizer, weights=str(a.facenet_weights) if a.facenet_weights else None,
                                device=a.device)
    from datamodules.synthetic.identities import manifest_identities
    from src.models.face_backbone import load_face_backbone

    if manifest is None:
        raise ValueError("--recognizer tiny needs the tiny world's manifest (synthetic world)")
    backbone = load_face_backbone(comps.face_backbone, comps.face_num_layers, comps.face_widths,
                                  comps.face_embedding_size).to(a.device)
    train_ids = manifest_identities(manifest, "train")[:8]
    return SyntheticFaceRecognizer(backbone, train_ids, image_size=size, num_calibration=a.calibration_renders,
                                   seed=a.seed)


def build_clip(a: argparse.Namespace, comps: Any) -> tuple[ClipScore | None, str | None]:
    """CLIP-T / CLIP-I scorer: a local open_clip checkpoint, or in the synthetic world the tiny CLIP."""
    if a.clip_checkpoint is not None:
        from src.metrics import load_open_clip

        model, preprocess, tokenizer = load_open_clip(a.clip_model, a.clip_checkpoint, device=a.device)
        return ClipScore(model, preprocess, tokenizer), f"{a.clip_model} ({a.clip_checkpoint})"
    if a.world != "synthetic":
        return None, None
    import open_clip
    from safetensors.torch import load_file

    from src.tiny import build_tiny_clip

    model = build_tiny_clip(0)
    model.load_state_dict(load_file(str(comps.clip_checkpoint)))
    return ClipScore(model.to(a.device), tokenizer=open_clip.get_tokenizer("ViT-B-32")), "tiny world CLIP (untrained)"


def build_fid_feature(a: argparse.Namespace) -> nn.Module | int:
    from src.metrics import TorchvisionInceptionFeatures
    from src.metrics.fid import FID_INCEPTION_FILE

    if a.fid_weights is None:
        raise ValueError("--fid-reference needs --fid-weights (a local Inception weights file; nothing is downloaded)")
    if a.fid_weights.name == FID_INCEPTION_FILE:
        return 2048
    return TorchvisionInceptionFeatures(a.fid_weights)


class _OnceFilter(logging.Filter):
    """Lets each distinct log message through once (the pipeline warns on every unrouted multi-ID call)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def multi_unrouted(mode: str, routed: bool) -> bool:
    """Whether the multi-ID splits run unrouted: `mode` "auto" (unrouted iff the model has no routers),
    "routed" (an error without routers) or "unrouted" (also for a model with routers)."""
    if mode == "routed" and not routed:
        raise ValueError("--multi-mode routed: the model has no routers (a stage-1 checkpoint); "
                         "use --multi-mode auto or unrouted, or stage-2 / router weights")
    return mode == "unrouted" or (mode == "auto" and not routed)


@dataclass
class SplitPlan:
    """The jobs of one multi-ID split: its identity groups, prompt indices and generation calls."""

    people: int
    groups: list[tuple[str, ...]]
    prompt_idx: list[int]
    jobs: list[Job]


def plan_splits(a: argparse.Namespace, ids: list[BenchIdentity], unrouted: bool) -> tuple[
        dict[int, SplitPlan], dict[int, str]]:
    """The multi-ID splits of `a.people` (planned) and those that cannot run (size -> reason).

    Groups: `prompts.identity_groups`, then `--pairs` (2 people) / `--groups` (3, 4) of them spread evenly;
    prompts: `--multi-prompts` of the split's prompt list, spread evenly.
    """
    by_name = {b.name: b for b in ids}
    plans, skipped = {}, {}
    for n in sorted(set(a.people)):
        groups = bp.spread(bp.identity_groups([b.name for b in ids], n), a.pairs if n == 2 else a.groups)
        if not groups:
            skipped[n] = f"fewer than {n} identities"
            continue
        prompt_idx = bp.spread(list(range(len(bp.GROUP_PROMPTS[n]))), a.multi_prompts)
        jobs = multi_jobs([[by_name[x] for x in g] for g in groups], prompt_idx, unrouted)
        plans[n] = SplitPlan(n, groups, prompt_idx, jobs)
    return plans, skipped


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the benchmark images, score them, write results.json / .md / .png and, per
    multi-ID split, people<n>_metrics.png and people<n>_sheet.png.

    `args`: the options of `python -m src.evaluate` with the world's defaults filled in (src/cli/evaluate.py's
    `resolve`); `args.checkpoint` is set to the checkpoint read when it defaulted. Returns results.json's dict.
    """
    a = args
    photos = reference_photos(a.references, a.identities) if a.world == "real" else None  # before any weights
    loaded = load_pipeline(components=a.components, base_model=a.base_model, tiny_root=a.tiny_root,
                           checkpoint=a.checkpoint, released_faceid=a.released_faceid,
                           released_router=a.released_router, dim_head=a.dim_head, device=a.device)
    pipe, comps, a.checkpoint = loaded.pipeline, loaded.components, loaded.checkpoint
    model_label = "released UniPortrait" if a.released_faceid is not None else a.checkpoint.name
    size = pipe.pipe.unet.config.sample_size * pipe.pipe.vae_scale_factor
    manifest = None
    if a.world == "synthetic":
        # the embedded world's data: under --tiny-root (whatever --base-model says: the tiny SDXL world
        # trains on the SD1.5 world's data), or beside the base model a --components file names
        root = Path(comps.base_model).parent if a.components is not None else Path(a.tiny_root)
        mpath = root / "data" / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"synthetic world: {mpath} not found (run `make tiny`, or give --tiny-root)")
        manifest = json.loads(mpath.read_text())
    recognizer = build_metric_recognizer(a, comps, manifest, size)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.world == "synthetic":
        ids = synthetic_identities(manifest, a.identities, recognizer, size, a.out / "references")
    else:
        ids = real_identities(photos, recognizer)
    by_name = {b.name: b for b in ids}

    unrouted = multi_unrouted(a.multi_mode, bool(adapters.router_parameters(pipe.pipe.unet)))
    pipe_log = logging.getLogger(UniPortraitPipeline.__module__)
    if unrouted and not any(isinstance(f, _OnceFilter) for f in pipe_log.filters):
        pipe_log.addFilter(_OnceFilter())
    single_idx = bp.spread(list(range(len(bp.SINGLE_PROMPTS))), a.prompts)
    jobs: list[Job] = single_jobs(ids, single_idx) if a.protocol in ("single", "both") else []
    plans, skipped = plan_splits(a, ids, unrouted) if a.protocol in ("multi", "both") else ({}, {})
    for plan in plans.values():
        jobs += plan.jobs

    gen = {"steps": a.steps, "guidance": a.guidance, "face_scale": a.face_scale, "structure_scale": a.structure_scale,
           "scheduler": a.scheduler, "negative_prompt": a.negative_prompt, "seed": a.seed}
    model_key = {"checkpoint": model_fingerprint(a.checkpoint), "released_faceid": model_fingerprint(a.released_faceid),
                 "released_router": model_fingerprint(a.released_router), "base_model": str(comps.base_model),
                 "world": a.world, "dim_head": a.dim_head,  # the generator's identity inputs too:
                 "references": [model_fingerprint(p) for _, _, p, _ in photos] if photos else None}
    tag = generation_tag({**gen, **model_key})
    root = a.out / "images" / tag
    clip, clip_name = build_clip(a, comps)

    def clip_copy() -> ClipScore | None:  # one CLIP accumulator per protocol / split
        return None if clip is None else ClipScore(clip.model, clip.preprocess, clip.tokenizer)

    single = ProtocolScores(recognizer, clip)
    splits = {n: SplitScores(n, recognizer, clip_copy(), unrouted,
                             set(bp.spread([(j.names, j.prompt_index) for j in p.jobs], a.sheet_size)))
              for n, p in plans.items()}
    reused = 0
    for job in tqdm(jobs, desc="benchmark generations", unit="call"):
        loaded = load_job(job, root, a.images)
        if loaded is None:
            images, routing = generate_job(pipe, job, [by_name[n].identity for n in job.names], root, a.images, gen)
        else:
            images, routing = loaded
            reused += 1
        refs = [by_name[n] for n in job.names]
        if job.protocol == "single":
            single.add(job, images, refs, keep_for_fid=a.fid_reference is not None)
        else:
            splits[job.people].add(job, images, refs, routing, keep_for_fid=a.fid_reference is not None)

    results: dict[str, Any] = {
        "world": a.world, "model": model_label, "recognizer": a.recognizer, "clip": clip_name,
        "multi_mode": UNROUTED_LABEL if unrouted else ROUTED_LABEL,
        "generation_tag": tag, "images_dir": str(root), "reused_calls": reused, "generated_calls": len(jobs) - reused,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "identities": [{"name": b.name, "class_word": b.class_word} for b in ids],
        "published": bp.PUBLISHED, "published_recognizer": bp.PUBLISHED_RECOGNIZER,
        "note": RECOGNIZER_NOTE,
    }
    if isinstance(recognizer, SyntheticFaceRecognizer):
        results["recognizer_calibration"] = recognizer.calibration
    fid_feature = build_fid_feature(a) if a.fid_reference is not None else None

    def fid(images: list[np.ndarray]) -> float | None:
        return compute_fid(images, a.fid_reference, fid_feature, a.fid_weights) if fid_feature is not None else None

    if single.num_images:
        results["single"] = {**single.summary(fid(single.fid_images)), "num_prompts": len(single_idx),
                             "num_identities": len(ids)}
    if a.protocol in ("multi", "both"):
        results["multi"] = {str(n): {"skipped": why} for n, why in skipped.items()}
        for n, s in splits.items():
            results["multi"][str(n)] = {**s.summary(fid(s.fid_images)), "num_groups": len(plans[n].groups),
                                        "num_prompts": len(plans[n].prompt_idx),
                                        "groups": ["+".join(g) for g in plans[n].groups]}
    (a.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, a.out / "results.md")
    write_plot(results, a.out / "results.png")
    colours = identity_colours([b.name for b in ids])
    for n, s in splits.items():
        write_split_plot(a.out / f"people{n}_metrics.png", results, n)
        members = {x for g in plans[n].groups for x in g}
        title = f"{n} people, {s.mode}: model {model_label}; {source_label(results)}"
        write_contact_sheet(a.out / f"people{n}_sheet.png", title,
                            [(b.name, b.image) for b in ids if b.name in members], s.sheet, colours)
    return results
