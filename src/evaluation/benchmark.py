"""The identity-preservation benchmark's run (`make eval`, `python -m src.evaluate`; options in
src/cli/evaluate.py): load the model, the recogniser and the identities, generate or reuse every job's
images, score them, write results.json / results.md / results.png.

build_metric_recognizer  the Face Sim recogniser: the synthetic world's own, or dlib / FaceNet
build_clip               CLIP-T / CLIP-I: a local open_clip checkpoint, or the tiny world's CLIP
build_fid_feature        the FID feature network (local weights only)
run                      the whole benchmark
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from src.evaluation import prompts as bp
from src.evaluation.identities import real_identities, reference_photos, synthetic_identities
from src.evaluation.jobs import Job, generate_job, generation_tag, load_job, model_fingerprint, multi_jobs, single_jobs
from src.evaluation.reports import RECOGNIZER_NOTE, write_markdown, write_plot
from src.evaluation.scoring import ProtocolScores, compute_fid
from src.evaluation.synthetic_recognizer import SyntheticFaceRecognizer
from src.inference.loading import load_pipeline
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the benchmark images, score them, write results.json / .md / .png.

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
        mpath = Path(comps.base_model).parent / "data" / "manifest.json"
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

    routed = bool(adapters.router_parameters(pipe.pipe.unet))
    single_idx = bp.spread(list(range(len(bp.SINGLE_PROMPTS))), a.prompts)
    multi_idx = bp.spread(list(range(len(bp.MULTI_PROMPTS))), a.multi_prompts)
    pairs = bp.spread(bp.all_pairs([b.name for b in ids]), a.pairs)
    jobs: list[Job] = []
    multi_skip = None
    if a.protocol in ("single", "both"):
        jobs += single_jobs(ids, single_idx)
    if a.protocol in ("multi", "both"):
        if not routed:
            multi_skip = "the model has no routers (a stage-1 checkpoint): multi-ID needs stage-2 / router weights"
            if a.protocol == "multi":
                raise ValueError(f"--protocol multi: {multi_skip}")
        elif len(ids) < 2:
            multi_skip = "fewer than 2 identities"
        else:
            jobs += multi_jobs([(by_name[x], by_name[y]) for x, y in pairs], multi_idx)

    gen = {"steps": a.steps, "guidance": a.guidance, "face_scale": a.face_scale, "structure_scale": a.structure_scale,
           "scheduler": a.scheduler, "negative_prompt": a.negative_prompt, "seed": a.seed}
    model_key = {"checkpoint": model_fingerprint(a.checkpoint), "released_faceid": model_fingerprint(a.released_faceid),
                 "released_router": model_fingerprint(a.released_router), "base_model": str(comps.base_model),
                 "world": a.world}
    tag = generation_tag({**gen, **model_key})
    root = a.out / "images" / tag
    clip, clip_name = build_clip(a, comps)
    scores = {"single": ProtocolScores(recognizer, clip), "multi": ProtocolScores(recognizer, clip)}
    if clip is not None:  # one CLIP accumulator per protocol
        scores["multi"].clip = ClipScore(clip.model, clip.preprocess, clip.tokenizer)
    reused = 0
    for job in tqdm(jobs, desc="benchmark generations", unit="call"):
        loaded = load_job(job, root, a.images)
        if loaded is None:
            images, routing = generate_job(pipe, job, [by_name[n].identity for n in job.names], root, a.images, gen)
        else:
            images, routing = loaded
            reused += 1
        scores[job.protocol].add(job, images, [by_name[n] for n in job.names], routing,
                                 keep_for_fid=a.fid_reference is not None)

    results: dict[str, Any] = {
        "world": a.world, "model": model_label, "recognizer": a.recognizer, "clip": clip_name,
        "generation_tag": tag, "images_dir": str(root), "reused_calls": reused, "generated_calls": len(jobs) - reused,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "identities": [{"name": b.name, "class_word": b.class_word} for b in ids],
        "published": bp.PUBLISHED, "published_recognizer": bp.PUBLISHED_RECOGNIZER,
        "note": RECOGNIZER_NOTE,
    }
    if isinstance(recognizer, SyntheticFaceRecognizer):
        results["recognizer_calibration"] = recognizer.calibration
    fid_feature = build_fid_feature(a) if a.fid_reference is not None else None
    for protocol, n_items, n_prompts in (("single", len(ids), len(single_idx)), ("multi", len(pairs), len(multi_idx))):
        s = scores[protocol]
        if s.num_images == 0:
            if protocol == "multi" and multi_skip:
                results["multi"] = {"skipped": multi_skip}
            continue
        fid = (compute_fid(s.fid_images, a.fid_reference, fid_feature, a.fid_weights)
               if fid_feature is not None else None)
        summary = s.summary(fid)
        summary["num_prompts"] = n_prompts
        summary["num_identities" if protocol == "single" else "num_pairs"] = n_items
        results[protocol] = summary
    (a.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, a.out / "results.md")
    write_plot(results, a.out / "results.png")
    return results
