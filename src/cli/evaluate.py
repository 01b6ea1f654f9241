"""The identity-preservation benchmark (FastComposer protocol, as in the UniPortrait paper): `make eval`.

    python -m src.evaluate                      # embedded default: tiny checkpoint, synthetic identities
    python -m src.evaluate --components configs/stage1.yaml --released-faceid uniportrait-faceid_sd15.bin \\
        --released-router uniportrait-router_sd15.bin --references ../shared/data/celeba_eval --out eval/released
    python -m src.evaluate --identities 3 --prompts 4 --images 1 --pairs 2 --protocol both   # quick subset
    python -m src.evaluate --checkpoint runs/tiny/stage1/checkpoints/last.ckpt --out runs/eval/tiny-stage1

Protocols (src/evaluation/prompts.py): single-ID = identities x 40 prompts x N images; multi-ID = three
splits (--people, default 2 3 4): 2 people = all pairs of the identities x the project's fixed 21
two-person prompts (the paper's protocol); 3 / 4 people = N fixed groups (`identity_groups`: cyclic
shifts of a Golomb ruler over the identity list; 15 identities -> 15 groups each) x 12 fixed prompts.
Subset options pick items spread evenly over each list (so every prompt category stays covered).

Multi-ID generation is routed when the model has routers (stage 2, released router). A model without
routers (stage 1) runs the splits unrouted: every identity applied everywhere with equal weight (all-ones
masks, single-ID LoRA), reported as "unrouted (no router)", the baseline that shows what routing buys
(--multi-mode unrouted forces it on a routed model too). Each split reports the paper's Face Sim and the
newer benchmarks' metrics (src/metrics/multi_id.py), CLIP-T, and routing accuracy inside detected faces.

Worlds:
- real (default when --components / --released-faceid is given): the 15 CelebA identities, reference
  photo `<references>/<id>.jpg` (default ../shared/data/celeba_eval), class words man/woman; scored
  with the pretrained dlib recogniser (default) or FaceNet (--recognizer facenet --facenet-weights).
- synthetic (the embedded default, no arguments): the tiny world under artifacts/tiny and the newest
  runs/tiny/**/last*.ckpt (`make demo`); identities = the manifest's held-out ("unseen") identities,
  each referenced by one aligned crop rendered by datamodules.synthetic; class word "person"; scored
  with `SyntheticFaceRecognizer` (a sliding-window detector + embedding on the tiny world's own face
  backbone; see its docstring and the calibration numbers written to results.json). CLIP scores use
  the tiny world's own (untrained) CLIP: they only exercise the code path.

Outputs in --out: images/<tag>/... (tag = hash of the model and generation settings; existing images
are reused, so an interrupted run resumes), references/, results.json (every number + the exact
configuration), results.md (tables in the paper's layout, published numbers beside ours after a break row
when recogniser or world differ, and the splits table), results.png, and per multi-ID split
people<n>_metrics.png (its metrics beside the published ones) and people<n>_sheet.png (contact sheet:
references, generations with matched face boxes, routing maps). Scores are x100 (%), as in the paper's
tables, except FID.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from src.cli import exit_status, run_or_exit
from src.evaluation import prompts as bp
from src.evaluation.benchmark import run
from src.evaluation.figures import measured_protocols
from src.evaluation.identities import DEFAULT_REFERENCES
from src.evaluation.reports import source_label
from src.inference.loading import check_weights


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint trained here (.ckpt / .safetensors); default: newest runs/tiny/**/last*.ckpt")
    g.add_argument("--released-faceid", type=Path, default=None,
                   help="released uniportrait-faceid_sd15.bin (or an exported uniportrait-faceid_sdxl.safetensors)")
    g.add_argument("--released-router", type=Path, default=None,
                   help="released uniportrait-router_sd15.bin (or uniportrait-router_sdxl.safetensors)")
    g.add_argument("--dim-head", type=int, default=None,
                   help="Q-Former head width of released weights (default: the file's metadata, else 64)")
    g.add_argument("--components", type=Path, default=None,
                   help="YAML with the ComponentPaths keys (or a training config); default: the tiny world")
    g.add_argument("--base-model", default=None,
                   help="diffusers SD1.5 or SDXL directory overriding components.base_model")
    g.add_argument("--tiny-root", type=Path, default=Path("artifacts/tiny"),
                   help="the embedded tiny world (components + data/manifest.json) (default artifacts/tiny)")
    g = p.add_argument_group("identities and metrics")
    g.add_argument("--world", choices=("auto", "synthetic", "real"), default="auto",
                   help="synthetic identities of the tiny world or real photographs; auto = synthetic unless "
                        "--components or --released-faceid is given")
    g.add_argument("--references", type=Path, default=None,
                   help=f"folder of <id>.jpg reference photos (real world; default {DEFAULT_REFERENCES})")
    g.add_argument("--recognizer", choices=("auto", "tiny", "dlib", "facenet"), default="auto",
                   help="face recogniser of Face Sim; auto = tiny (synthetic) or dlib (real)")
    g.add_argument("--facenet-weights", type=Path, default=None,
                   help="local InceptionResnetV1 VGGFace2 weights (20180402-114759-vggface2.pt) "
                        "for --recognizer facenet")
    g.add_argument("--calibration-renders", type=int, default=12,
                   help="synthetic images the tiny recogniser's face detector is calibrated on (default 12)")
    g.add_argument("--clip-model", default=None, help="open_clip architecture of --clip-checkpoint (paper: ViT-L-14)")
    g.add_argument("--clip-checkpoint", type=Path, default=None,
                   help="local open_clip checkpoint for CLIP-T / CLIP-I (synthetic world default: the tiny CLIP)")
    g.add_argument("--fid-reference", type=Path, default=None, help="folder of reference images for FID")
    g.add_argument("--fid-weights", type=Path, default=None,
                   help="local Inception weights for FID: torchvision inception_v3_google-*.pth (FIDs not comparable "
                        "with published ones) or torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    g = p.add_argument_group("protocol and subsets")
    g.add_argument("--protocol", choices=("single", "multi", "both"), default="both", help="which protocol(s)")
    g.add_argument("--identities", type=int, default=None, help="use K of the 15 identities (spread evenly)")
    g.add_argument("--prompts", type=int, default=None, help="use P of the 40 single-ID prompts (spread evenly)")
    g.add_argument("--multi-prompts", type=int, default=None,
                   help="use P of each multi-ID split's prompts (21 for 2 people, 12 for 3 and 4)")
    g.add_argument("--people", type=int, nargs="+", choices=bp.SPLIT_SIZES, default=list(bp.SPLIT_SIZES),
                   help="multi-ID splits to run, by people per image (default: 2 3 4)")
    g.add_argument("--pairs", type=int, default=None,
                   help="use M of the identity pairs (spread evenly); default all (105), 21 in the synthetic world")
    g.add_argument("--groups", type=int, default=None,
                   help="use M of the 3- and 4-person groups each (spread evenly); default all (15 with 15 ids)")
    g.add_argument("--multi-mode", choices=("auto", "routed", "unrouted"), default="auto",
                   help="multi-ID routing: auto = routed when the model has routers, else unrouted (all-ones masks)")
    g.add_argument("--sheet-size", type=int, default=12,
                   help="generations per split on its contact sheet (first image of jobs spread evenly; default 12)")
    g.add_argument("--images", type=int, default=None,
                   help="images per (identity, prompt); default 4 (real), 1 (synthetic)")
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default 25 real, 10 synthetic)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5 real, 3.0 synthetic)")
    g.add_argument("--face-scale", type=float, default=None,
                   help="face-ID attention scale (default 0.7 real, 1.0 synthetic)")
    g.add_argument("--structure-scale", type=float, default=None,
                   help="face structure scale beta (default 0.1 single / 0.3 multi)")
    g.add_argument("--scheduler", default="ddim", help="sampler (default ddim)")
    g.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    g.add_argument("--seed", type=int, default=0, help="seed of every generation call (default 0)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/eval/<world>)")
    return p


WORLD_DEFAULTS = {
    "real": {"images": 4, "steps": 25, "guidance": 7.5, "face_scale": 0.7, "pairs": None, "groups": None},
    "synthetic": {"images": 1, "steps": 10, "guidance": 3.0, "face_scale": 1.0, "pairs": 21, "groups": None},
}


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the world-dependent defaults (returns a copy)."""
    a = argparse.Namespace(**vars(args))
    if a.world == "auto":
        a.world = "real" if (a.components is not None or a.released_faceid is not None) else "synthetic"
    for key, value in WORLD_DEFAULTS[a.world].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.recognizer == "auto":
        a.recognizer = "tiny" if a.world == "synthetic" else "dlib"
    if a.world == "real" and a.references is None:
        a.references = DEFAULT_REFERENCES
    if a.out is None:
        a.out = Path("runs/eval") / a.world
    check_weights(a.checkpoint, a.released_faceid, a.released_router)
    if (a.clip_model is None) != (a.clip_checkpoint is None) and not (a.world == "synthetic" and a.clip_model is None):
        raise ValueError("--clip-model and --clip-checkpoint go together")
    if a.images < 1:
        raise ValueError(f"--images must be >= 1, got {a.images}")
    if a.sheet_size < 1:
        raise ValueError(f"--sheet-size must be >= 1, got {a.sheet_size}")
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    results = run_or_exit(lambda args: run(resolve(args)), build_parser().parse_args(argv))
    out = Path(results["config"]["out"])
    for label, r in measured_protocols(results):
        name = label.replace("\n", " ")
        print(f"{name}: Face Sim {r['face_sim']:.1f}% over {r['num_images']} images ({source_label(results)})")
    for n, r in sorted((results.get("multi") or {}).items()):
        if "skipped" in r:
            print(f"{n} people: skipped ({r['skipped']})")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} and the splits' pictures")
    return results


def console() -> None:
    """Console script `uniportrait-eval`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
