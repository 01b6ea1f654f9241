"""The identity-preservation benchmark (FastComposer protocol, as in the UniPortrait paper): `make eval`.

    python -m src.evaluate                      # embedded default: tiny checkpoint, synthetic identities
    python -m src.evaluate --components configs/stage1.yaml --released-faceid uniportrait-faceid_sd15.bin \\
        --released-router uniportrait-router_sd15.bin --references ../shared/data/celeba_eval --out eval/released
    python -m src.evaluate --identities 3 --prompts 4 --images 1 --pairs 2 --protocol both   # quick subset

Protocols (src/benchmark_prompts.py): single-ID = identities x 40 prompts x N images; multi-ID = all
pairs of the identities x the project's fixed 21 two-person prompts x N images. Subset options pick
items spread evenly over each list (so every prompt category stays covered).

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
configuration), results.md (tables in the paper's layout, published numbers beside ours), results.png.
Scores are x100 (%), as in the paper's tables, except FID.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from src import benchmark_prompts as bp
from src.conventions import FACE_RECOG_SIZE, to_recog_pixels, uint8_to_unit
from src.faces import NoFaceError, box_mask, load_rgb
from src.generate import run_or_exit
from src.metrics import ClipScore, FaceSimilarity, RoutingAccuracy, greedy_match, image_face_score
from src.models import adapters
from src.recognizers import FaceRecognizer, build_recognizer, check_image, sort_largest_first

log = logging.getLogger("src.evaluate")

DEFAULT_REFERENCES = Path("../shared/data/celeba_eval")
SYNTHETIC_CLASS_WORD = "person"
SYNTHETIC_REFERENCE_SEED = 9191  # first entropy word of the synthetic reference renders

__all__ = [
    "SyntheticFaceRecognizer", "BenchIdentity", "build_parser", "run", "main", "sliding_windows", "nms",
]
# ---------------------------------------------------------------------------------- synthetic recogniser
SYNTHETIC_WINDOW_FRACTIONS = (0.4, 0.55, 0.75, 1.0)  # window side / image side
FACE_WINDOW_EXPANSION = 1.4  # a face's "true" square window: 1.4 x its box side (the aligned crop's margin)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (P, 4) and b (Q, 4) [x0, y0, x1, y1] -> (P, Q)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def sliding_windows(size: int, fractions: Sequence[float] = SYNTHETIC_WINDOW_FRACTIONS) -> np.ndarray:
    """Square windows (W, 4) [x0, y0, x1, y1] over a size x size image: each side in `fractions` of the
    image, stride a third of the side, the last window flush with the border (57 windows at 64 px)."""
    boxes = []
    for frac in fractions:
        side = max(8, int(round(frac * size)))
        stride = max(1, side // 3)
        starts = sorted(set(list(range(0, size - side + 1, stride)) + [size - side]))
        boxes += [[x, y, x + side, y + side] for y in starts for x in starts]
    return np.asarray(boxes, dtype=np.float32)


def face_square(box: Sequence[float]) -> np.ndarray:
    """The square window a detector should find for a face box: centred, FACE_WINDOW_EXPANSION x its long side."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = FACE_WINDOW_EXPANSION * max(box[2] - box[0], box[3] - box[1]) / 2
    return np.array([cx - half, cy - half, cx + half, cy + half], dtype=np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, cover: float = 0.6) -> list[int]:
    """Greedy non-maximum suppression (highest score first). A box is dropped when its IoU with a kept
    box exceeds `iou`, or when `cover` of the smaller box's area lies inside a kept box."""
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        ok = True
        for j in keep:
            lt = np.maximum(boxes[i, :2], boxes[j, :2])
            rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = float(np.clip(rb - lt, 0, None).prod())
            ai = float((boxes[i, 2:] - boxes[i, :2]).prod())
            aj = float((boxes[j, 2:] - boxes[j, :2]).prod())
            if inter / (ai + aj - inter) > iou or inter / min(ai, aj) > cover:
                ok = False
                break
        if ok:
            keep.append(int(i))
    return keep


def fit_logistic(pos: Tensor, neg: Tensor, steps: int = 100, weight_decay: float = 1e-3) -> tuple[Tensor, float]:
    """Class-balanced L2-regularised logistic regression face (pos (P, D)) vs background (neg (Q, D)) windows.

    Returns (weight (D,), bias); deterministic (zero init, full-batch L-BFGS).
    """
    x = torch.cat([pos, neg]).float()  # (P+Q, D)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    sample_w = torch.cat([torch.full((len(pos),), 0.5 / len(pos)), torch.full((len(neg),), 0.5 / len(neg))])
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * sample_w).sum()
        loss = loss + weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), float(b.detach())


class SyntheticFaceRecognizer:
    """A `FaceRecognizer` for the synthetic (cartoon) world, built on the tiny world's own face backbone.

    Real detectors (MTCNN, dlib) find no cartoon faces, so detection here is a sliding-window detector
    on the same backbone: every square window (`sliding_windows`, 6 sizes, stride 1/4 side) is resized
    to 112 px and embedded; a window's *faceness* is a logistic regression on its L2-normalised
    embedding (face windows vs background windows, `fit_logistic`), fitted at construction on freshly
    rendered 1- and 2-face images of *training* identities (never the evaluated ones;
    reference-independent); logit >= 0 is a face. Windows above the threshold go through NMS; the kept
    windows are the faces, largest first (the protocol's order); their embeddings are the face
    embeddings. `calibration` reports how well this detector separates face from background windows
    on its calibration renders: read it before trusting face counts.

    References are aligned crops from the synthetic layout (exact), embedded whole (`embed_aligned`).
    Caveat: it is the same backbone whose features condition the generator, so a model could in
    principle match it without looking like the person; it stands in for an independent recogniser
    only in the embedded default. Real photographs are scored with `DlibRecognizer` / FaceNet.
    """

    def __init__(
        self,
        backbone: nn.Module,
        calibration_identities: Sequence[int],
        image_size: int = 64,
        num_calibration: int = 12,
        nms_iou: float = 0.3,
        seed: int = 0,
        batch_size: int = 128,
    ) -> None:
        if not calibration_identities:
            raise ValueError("SyntheticFaceRecognizer needs at least one calibration identity")
        self.backbone = backbone.eval()
        self.batch_size = batch_size
        self.nms_iou = nms_iou
        self.image_size = image_size
        self.windows = sliding_windows(image_size)  # (W, 4)
        self.bias = 0.0
        self.direction, self.threshold, self.calibration = self._calibrate(
            list(calibration_identities), num_calibration, seed
        )

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def embed_crops(self, crops: Tensor) -> Tensor:
        """(M, 3, h, w) crops in [-1, 1] -> (M, D) L2-normalised embeddings (resized to 112 px)."""
        out = []
        for i in range(0, len(crops), self.batch_size):
            x = to_recog_pixels(crops[i : i + self.batch_size].to(self.device))  # (b, 3, 112, 112)
            out.append(F.normalize(self.backbone(x).embedding.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    def embed_aligned(self, crop: np.ndarray) -> Tensor:
        """uint8 (h, w, 3) aligned face crop -> (D,) embedding of the whole crop."""
        return self.embed_crops(uint8_to_unit(check_image(crop))[None])[0]

    def window_embeddings(self, image: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """uint8 (S, S, 3) -> (embeddings (W, D), windows (W, 4)); the image is resized to image_size."""
        image = check_image(image)
        x = uint8_to_unit(image)[None]  # (1, 3, H, W)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        crops = [F.interpolate(x[:, :, int(y0):int(y1), int(x0):int(x1)], size=(FACE_RECOG_SIZE, FACE_RECOG_SIZE),
                               mode="bilinear", align_corners=False)[0] for x0, y0, x1, y1 in self.windows.tolist()]
        return self.embed_crops(torch.stack(crops)), self.windows  # (W, D), (W, 4)

    def _calibrate(self, ids: list[int], n: int, seed: int) -> tuple[Tensor, float, dict[str, float]]:
        """Fit the faceness direction and threshold on rendered 1- and 2-face images of `ids`."""
        from datamodules.synthetic import FaceCache, render_sample

        cache, pos, neg, renders = FaceCache(), [], [], []
        for i in range(n):
            rng = np.random.default_rng([seed, 4242, i])
            k = 1 + i % 2 if len(ids) > 1 else 1
            who = [int(v) for v in rng.choice(ids, size=k, replace=False)]
            s = render_sample(rng, who, self.image_size, FACE_RECOG_SIZE, f"calib_{i}", cache)
            renders.append((s.image, len(who)))
            emb, win = self.window_embeddings(s.image)
            iou = box_iou(win, np.stack([face_square(f.box) for f in s.faces]))  # (W, K)
            pos.append(emb[torch.from_numpy(iou.max(1) >= 0.5)])
            neg.append(emb[torch.from_numpy(iou.max(1) < 0.1)])
        p, q = torch.cat(pos), torch.cat(neg)  # (P, D), (Q, D)
        if len(p) == 0 or len(q) == 0:
            raise RuntimeError(f"calibration found {len(p)} face and {len(q)} background windows; need both")
        weight, bias = fit_logistic(p, q)
        sp, sq = p @ weight + bias, q @ weight + bias  # logits
        threshold = 0.0
        stats = {"face_windows": len(p), "background_windows": len(q),
                 "face_window_recall": float((sp >= threshold).float().mean()),
                 "background_rejection": float((sq < threshold).float().mean())}
        self.direction, self.bias, self.threshold = weight, bias, threshold
        stats["face_count_accuracy_on_calibration_renders"] = float(np.mean(
            [len(self.embed_faces(img)[0]) == k for img, k in renders]))
        return weight, threshold, stats

    def embed_faces(self, image: np.ndarray) -> tuple[Tensor, Tensor]:
        """uint8 (H, W, 3) -> (embeddings (K, D) L2-normalised, boxes (K, 4) in the image's pixels), largest first."""
        h, w = image.shape[:2]
        emb, win = self.window_embeddings(image)
        score = (emb @ self.direction + self.bias).numpy()  # (W,) faceness logits
        cand = np.flatnonzero(score >= self.threshold)
        keep = cand[nms(win[cand], score[cand], self.nms_iou)] if len(cand) else cand
        if len(keep) == 0:
            return torch.zeros(0, emb.shape[1]), torch.zeros(0, 4)
        boxes = win[keep] * np.array([w, h, w, h], dtype=np.float32) / self.image_size
        order = sort_largest_first(boxes)
        return emb[torch.from_numpy(keep[order])], torch.from_numpy(boxes[order])

    def embed_reference(self, image: np.ndarray) -> Tensor | None:
        """(D,) embedding of the largest detected face, or None (use `embed_aligned` for aligned crops)."""
        emb, _ = self.embed_faces(image)
        return emb[0] if len(emb) else None


# ---------------------------------------------------------------------------------------------- identities
@dataclass
class BenchIdentity:
    """One evaluated identity: its name, class word, generator input and reference for the metrics.

    embedding: (D,) reference embedding from the metric's recogniser.
    image: uint8 (H, W, 3) reference image for CLIP-I (the photo, or the aligned crop).
    """

    name: str
    class_word: str
    identity: Any  # src.pipeline.Identity
    embedding: Tensor
    image: np.ndarray


def reference_photos(references: Path, k: int | None) -> list[tuple[str, str, Path, np.ndarray]]:
    """The benchmark's CelebA reference photos (`<references>/<id>.jpg`), `k` identities spread over the
    list, read now: a missing folder, a missing photo or a file that is not an image is an error naming
    it (run() calls this before any weights load). Returns (name, class word, path, RGB uint8) each."""
    if not references.is_dir():
        raise FileNotFoundError(f"--references: no such folder {references} (expected <id>.jpg for the 15 ids)")
    out = []
    for name, word in bp.spread(list(bp.IDENTITIES), k):
        path = references / f"{name}.jpg"
        if not path.is_file():
            raise FileNotFoundError(f"--references: reference photo {path} of identity {name} is missing")
        out.append((name, word, path, load_rgb(path)))
    return out


def real_identities(photos: list[tuple[str, str, Path, np.ndarray]], recognizer: FaceRecognizer) -> list[BenchIdentity]:
    """Benchmark identities from `reference_photos`, each with its reference embedding."""
    from src.pipeline import Identity

    out = []
    for name, word, path, image in photos:
        emb = recognizer.embed_reference(image)
        if emb is None:
            raise NoFaceError(f"{path}: the recogniser found no face in this reference photo")
        out.append(BenchIdentity(name, word, Identity(references=[path]), emb, image))
    return out


def synthetic_reference(k: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One new single-face render of synthetic identity k -> uint8 aligned crops (recog (112, 112, 3), clip crop,
    scoring crop (112, 112, 3)).

    recog and clip condition the generator and are cut like the training data's (from the finer render,
    `render_sample`). The scoring crop is cut from the `size` px image itself, the way the recogniser sees the
    faces of generated `size` px images, so reference and generated faces are embedded alike.
    """
    from datamodules.synthetic import FaceCache, render_sample
    from src.alignment import align_face

    rng = np.random.default_rng([SYNTHETIC_REFERENCE_SEED, k])
    s = render_sample(rng, [k], size, FACE_RECOG_SIZE, f"reference_{k}", FaceCache())
    scored = align_face(s.image, np.asarray(s.faces[0].landmarks), FACE_RECOG_SIZE)  # (112, 112, 3)
    return s.recog[0], s.clip[0], scored


def synthetic_identities(
    manifest: dict, k: int | None, recognizer: SyntheticFaceRecognizer, size: int, save_dir: Path | None = None
) -> list[BenchIdentity]:
    """Held-out synthetic identities (manifest "unseen"), at most 15, `k` of them spread over the list."""
    from datamodules.synthetic import manifest_identities
    from src.pipeline import Identity

    ids = manifest_identities(manifest, "unseen")[: len(bp.IDENTITIES)]
    if not ids:
        raise ValueError("manifest.json lists no held-out ('unseen') identities to evaluate")
    out = []
    for idx in bp.spread(ids, k):
        recog, clip, scored = synthetic_reference(idx, size)
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(recog).save(save_dir / f"syn_{idx}.png")
        out.append(BenchIdentity(f"syn_{idx}", SYNTHETIC_CLASS_WORD, Identity.from_crops(recog, clip),
                                 recognizer.embed_aligned(scored), recog))
    return out


# ---------------------------------------------------------------------------------------------- generation
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


# ------------------------------------------------------------------------------------------------- scoring
@dataclass
class ProtocolScores:
    """Accumulators of one protocol: Face Sim overall / per category / per identity, CLIP, routing."""

    recognizer: FaceRecognizer
    clip: ClipScore | None
    face: FaceSimilarity = field(init=False)
    categories: dict[str, FaceSimilarity] = field(default_factory=dict)
    per_identity: dict[str, FaceSimilarity] = field(default_factory=dict)
    routing: RoutingAccuracy = field(default_factory=RoutingAccuracy)
    routing_images: int = 0
    num_images: int = 0
    fid_images: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.face = FaceSimilarity(self.recognizer)

    def _metric(self, table: dict[str, FaceSimilarity], key: str) -> FaceSimilarity:
        if key not in table:
            table[key] = FaceSimilarity(self.recognizer)
        return table[key]

    def add(self, job: Job, images: list[np.ndarray], refs: list[BenchIdentity], routing: list[Tensor] | None,
            keep_for_fid: bool) -> None:
        ref = torch.stack([r.embedding for r in refs])  # (R, D)
        category = bp.prompt_category(job.template)
        for i, image in enumerate(images):
            faces, boxes = self.recognizer.embed_faces(image)  # (K, D), (K, 4)
            score = image_face_score(faces, F.normalize(ref.float(), dim=-1))
            for m in (self.face, self._metric(self.categories, category)):
                m.add_score(score)
            for r in refs:
                self._metric(self.per_identity, r.name).add_score(score)
            if routing:
                self.add_routing(image, faces, boxes, ref, [h[i : i + 1] for h in routing])
        if self.clip is not None:
            self.clip.update(images, texts=[job.prompt] * len(images))
            for r in refs:
                self.clip.update(images, references=[r.image] * len(images))
        if keep_for_fid:
            self.fid_images += images
        self.num_images += len(images)

    def add_routing(self, image: np.ndarray, faces: Tensor, boxes: Tensor, ref: Tensor, maps: list[Tensor]) -> None:
        """Routing accuracy of the last denoising step inside the detected faces matched to identities.

        faces (K, D), boxes (K, 4) of this image; ref (R, D); maps: per layer (1, R, h, w) hard routing.
        Identity j's mask is the box of the face greedily matched to it; unmatched identities are invalid.
        """
        h, w = image.shape[:2]
        r = ref.shape[0]
        masks = torch.zeros(1, r, h, w)
        valid = torch.zeros(1, r, dtype=torch.bool)
        if len(faces):
            sim = (faces.float() @ F.normalize(ref.float(), dim=-1).T).clamp_min(0)  # (K, R)
            for g, j, _ in greedy_match(sim):
                masks[0, j] = torch.from_numpy(box_mask(h, w, boxes[g].numpy())).float()
                valid[0, j] = True
        self.routing_images += 1
        for hard in maps:
            self.routing.update(hard.float(), masks, valid, torch.zeros(1, dtype=torch.long))

    def summary(self, fid: float | None) -> dict[str, Any]:
        """Numbers of this protocol (x100 except FID and counts)."""
        pct = lambda v: round(100 * float(v), 3)  # noqa: E731
        warnings.filterwarnings("ignore", message=".*compute.*before the ..update", category=UserWarning)
        face = self.face.compute()  # scores were added with add_score (torchmetrics saw no update call)
        out: dict[str, Any] = {"num_images": self.num_images, **{k: pct(v) for k, v in face.items()}}
        if self.clip is not None:
            out.update({k: round(float(v), 3) for k, v in self.clip.compute().items()})
        out["fid"] = fid
        if self.routing_images:
            acc = float(self.routing.compute()["all"])
            out["routing_accuracy"] = None if math.isnan(acc) else pct(acc)
        out["per_category"] = {k: pct(m.compute()["face_sim"]) for k, m in self.categories.items()}
        out["per_identity"] = {k: pct(m.compute()["face_sim"]) for k, m in self.per_identity.items()}
        return out


def compute_fid(images: list[np.ndarray], reference_dir: Path, feature: nn.Module | int, weights: Path | None) -> float:
    """FID of generated uint8 (H, W, 3) images against every image file in `reference_dir`.

    feature: an nn.Module taking (B, 3, H, W) in [-1, 1] (e.g. TorchvisionInceptionFeatures), or an
    Inception layer size for torch-fidelity's network with local `weights` (uint8 input).
    """
    from src.metrics import fid_metric

    files = sorted(p for p in reference_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if len(files) < 2 or len(images) < 2:
        raise ValueError(f"FID needs at least 2 reference images in {reference_dir} (found {len(files)}) "
                         f"and 2 generated images (got {len(images)})")
    metric = fid_metric(feature, weights=None if isinstance(feature, nn.Module) else weights)

    def batch(arrays: list[np.ndarray]) -> Tensor:
        x = torch.stack([uint8_to_unit(np.asarray(Image.fromarray(a).resize((299, 299), Image.BICUBIC)))
                         for a in arrays])  # (B, 3, 299, 299) in [-1, 1]
        return x if isinstance(feature, nn.Module) else ((x + 1) * 127.5).round().to(torch.uint8)

    for i in range(0, len(files), 16):
        metric.update(batch([load_rgb(p) for p in files[i : i + 16]]), real=True)
    for i in range(0, len(images), 16):
        metric.update(batch(images[i : i + 16]), real=False)
    return round(float(metric.compute()), 3)


# ------------------------------------------------------------------------------------------------- reports
RECOGNIZER_NOTE = (
    "Numbers measured with different face recognisers are not comparable: the published numbers use "
    "MTCNN + FaceNet (InceptionResnetV1, VGGFace2) on real photographs; ours use the recogniser named above."
)


def fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def markdown_table(protocol: str, ours: dict[str, Any], label: str, recognizer: str) -> list[str]:
    """The paper's table layout (Face Sim / CLIP-T / FID) with our row and the published rows."""
    lines = ["| Method | Face Sim (%) ↑ | CLIP-T (%) ↑ | FID ↓ | Source |", "|---|---|---|---|---|"]
    lines.append(f"| **{label}** | {fmt(ours.get('face_sim'))} | {fmt(ours.get('clip_t'))} | {fmt(ours.get('fid'))} "
                 f"| this run ({recognizer} recogniser) |")
    for method, nums in bp.PUBLISHED[protocol].items():
        lines.append(f"| {method} (published) | {fmt(nums['face_sim'])} | {fmt(nums['clip_t'])} | {fmt(nums['fid'])} "
                     f"| published (paper, {bp.PUBLISHED_RECOGNIZER}) |")
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> None:
    cfg = results["config"]
    label = f"ours ({results['model']})"
    lines = [f"# Identity-preservation benchmark ({results['world']} world)", "",
             f"Recogniser: **{results['recognizer']}**. {RECOGNIZER_NOTE}", ""]
    if results["world"] == "synthetic":
        lines += ["Synthetic world: cartoon identities scored by the tiny world's own face backbone (sliding-window "
                  "detector); CLIP scores come from the tiny, untrained CLIP. These numbers check the pipeline and "
                  "compare tiny checkpoints with each other only.", ""]
    single = results.get("single")
    if single:
        lines += [f"## Single-ID ({single['num_identities']} identities x {single['num_prompts']} prompts x "
                  f"{cfg['images']} images = {single['num_images']} images)", ""]
        lines += markdown_table("single", single, label, results["recognizer"]) + [""]
        lines += ["Face Sim by prompt category: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in single["per_category"].items()),
                  ""]
    multi = results.get("multi")
    if multi and "skipped" in multi:
        lines += ["## Multi-ID", "", f"Skipped: {multi['skipped']}", ""]
    elif multi:
        lines += [f"## Multi-ID ({multi['num_pairs']} pairs x {multi['num_prompts']} prompts x {cfg['images']} "
                  f"images = {multi['num_images']} images)", ""]
        lines += markdown_table("multi", multi, label, results["recognizer"]) + [""]
        lines += ["| Beyond the paper | value |", "|---|---|",
                  f"| right face count (%) | {fmt(multi.get('face_count_ok'))} |",
                  f"| duplicated identity (%) | {fmt(multi.get('duplicate_rate'))} |",
                  f"| routing accuracy in detected faces, last step (%) | {fmt(multi.get('routing_accuracy'))} |",
                  f"| no face found (%) | {fmt(multi.get('no_face_rate'))} |", ""]
    calib = results.get("recognizer_calibration")
    if calib:
        lines += [f"Synthetic face detector, on its own calibration renders: face-window recall "
                  f"{100 * calib['face_window_recall']:.0f}%, "
                  f"background rejection {100 * calib['background_rejection']:.0f}%, "
                  f"right face count {100 * calib['face_count_accuracy_on_calibration_renders']:.0f}% "
                  "(an upper bound on how far face counts and routing accuracy can be trusted here).", ""]
    lines += ["Rows marked *published* are the numbers printed in the UniPortrait paper, not measured here.", ""]
    path.write_text("\n".join(lines))


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Face Sim ours vs published per protocol, and ours per prompt category (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in ("single", "multi") if results.get(p) and "skipped" not in results[p]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for i, p in enumerate(protocols):
        names = [f"ours ({results['recognizer']})"] + [f"{m}\n(published)" for m in bp.PUBLISHED[p]]
        vals = [results[p]["face_sim"]] + [v["face_sim"] for v in bp.PUBLISHED[p].values()]
        xs = np.arange(len(vals)) + i * (len(bp.PUBLISHED["single"]) + 2)
        ax.bar(xs, vals, color=["tab:blue"] + ["tab:gray"] * (len(vals) - 1))
        for x, n in zip(xs, names):
            ax.text(x, 1, n, rotation=90, ha="center", va="bottom", fontsize=7)
        ax.text(xs.mean(), max(vals) + 3, f"{p}-ID", ha="center")
    ax.set_xticks([])
    ax.set_ylabel("Face Sim (%)")
    ax.set_title("Face Sim: ours vs published (recognisers differ)")
    ax = axes[1]
    for i, p in enumerate(protocols):
        cats = results[p]["per_category"]
        ax.bar(np.arange(len(cats)) + 0.4 * i, list(cats.values()), width=0.4, label=f"{p}-ID")
        ax.set_xticks(np.arange(len(cats)) + 0.2 * (len(protocols) - 1), list(cats))
    ax.set_ylabel("Face Sim (%)")
    ax.set_title("ours, by prompt category")
    if protocols:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint trained here (.ckpt / .safetensors); default: newest runs/tiny/**/last*.ckpt")
    g.add_argument("--released-faceid", type=Path, default=None, help="released uniportrait-faceid_sd15.bin")
    g.add_argument("--released-router", type=Path, default=None, help="released uniportrait-router_sd15.bin")
    g.add_argument("--dim-head", type=int, default=64, help="Q-Former head width of released weights (default 64)")
    g.add_argument("--components", type=Path, default=None,
                   help="YAML with the ComponentPaths keys (or a training config); default: the tiny world")
    g.add_argument("--base-model", default=None, help="diffusers SD1.5 directory overriding components.base_model")
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
    g.add_argument("--multi-prompts", type=int, default=None, help="use P of the 21 multi-ID prompts")
    g.add_argument("--pairs", type=int, default=None,
                   help="use M of the identity pairs (spread evenly); default all (105), 21 in the synthetic world")
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
    "real": {"images": 4, "steps": 25, "guidance": 7.5, "face_scale": 0.7, "pairs": None},
    "synthetic": {"images": 1, "steps": 10, "guidance": 3.0, "face_scale": 1.0, "pairs": 21},
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
    if a.released_faceid is not None and a.checkpoint is not None:
        raise ValueError("give either --checkpoint or --released-faceid, not both")
    if a.released_router is not None and a.released_faceid is None:
        raise ValueError("--released-router needs --released-faceid")
    if (a.clip_model is None) != (a.clip_checkpoint is None) and not (a.world == "synthetic" and a.clip_model is None):
        raise ValueError("--clip-model and --clip-checkpoint go together")
    if a.images < 1:
        raise ValueError(f"--images must be >= 1, got {a.images}")
    return a


def build_pipeline(a: argparse.Namespace) -> tuple[Any, Any, str]:
    """(pipeline, component paths, model label); the checkpoint defaults to the newest tiny run."""
    from src.generate import default_checkpoint, load_components
    from src.pipeline import UniPortraitPipeline
    from src.tiny import tiny_components

    comps = tiny_components(a.tiny_root) if a.components is None else load_components(a.components, a.base_model)
    if a.base_model is not None:
        comps.base_model = a.base_model
    if a.released_faceid is not None:
        pipe = UniPortraitPipeline.from_released(comps, a.released_faceid, a.released_router, dim_head=a.dim_head)
        return pipe.to(a.device), comps, "released UniPortrait"
    if a.checkpoint is None:
        a.checkpoint = default_checkpoint()
    pipe = UniPortraitPipeline.from_checkpoint(comps, a.checkpoint)
    return pipe.to(a.device), comps, a.checkpoint.name


def build_metric_recognizer(a: argparse.Namespace, comps: Any, manifest: dict | None, size: int) -> FaceRecognizer:
    if a.recognizer != "tiny":
        return build_recognizer(a.recognizer, weights=str(a.facenet_weights) if a.facenet_weights else None,
                                device=a.device)
    from datamodules.synthetic import manifest_identities
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
    """Generate (or reuse) the benchmark images, score them, write results.json / .md / .png."""
    a = resolve(args)
    photos = reference_photos(a.references, a.identities) if a.world == "real" else None  # before any weights
    pipe, comps, model_label = build_pipeline(a)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    results = run_or_exit(run, build_parser().parse_args(argv))
    out = Path(results["config"]["out"])
    for protocol in ("single", "multi"):
        r = results.get(protocol)
        if r and "skipped" not in r:
            print(f"{protocol}-ID: Face Sim {r['face_sim']:.1f}% over {r['num_images']} images "
                  f"({results['recognizer']})")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return results


if __name__ == "__main__":
    main()
