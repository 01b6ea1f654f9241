"""Turn raw photos, img2dataset-style shards or the CelebA layout into training shards.

    python -m datamodules.prepare --input photos/ --format folder --out data/shards \\
        --captions captions.jsonl --max-faces 1

Inputs (``--format``):
  folder  a directory of images (.jpg .jpeg .png .webp .bmp), searched recursively. Images inside
          a sub-folder get that first-level sub-folder's name as identity label. A sidecar
          ``<stem>.txt`` next to an image is its source text.
  wds     img2dataset-style WebDataset shards: a .tar file, a directory of .tar files, or a
          glob / brace pattern (``shards/{00000..00009}.tar``). Samples hold ``jpg`` (or jpeg,
          png, webp), ``txt`` (source text) and ``json`` (its ``caption`` is used if no txt).
  celeba  the CelebA layout: ``img_align_celeba/``, ``identity_CelebA.txt`` (identity labels),
          optionally ``list_landmarks_align_celeba.txt``; its landmarks are used as a fallback
          when MTCNN finds no face (``--no-landmark-fallback`` disables this).
          ``list_bbox_celeba.txt`` refers to the in-the-wild images and is not used.

Per image: decode (unreadable -> dropped), downscale so the longer side <= --resolution-max,
detect faces with MTCNN (retrying once on a padded copy), filter, align crops (112 recognition +
--clip-size CLIP crops), masks from boxes, caption. Drop reasons, checked in this order:
``unreadable``, ``no_face`` (nothing detected), ``low_confidence`` (no face with prob >=
--min-prob), ``too_small`` (no confident face with a box side >= --min-face-size),
``too_few_faces`` / ``too_many_faces`` (the confident, large-enough faces number outside
[--min-faces, --max-faces]). Smaller or less confident faces are not kept and do not count.
When an identity label is known it is given to the largest face.

Captions: the --captions JSONL (keyed by relative path, its stem, file name or wds key), then the
--captioner model when given, then the source text, then "a photo of a person" / "... N people".

Output: ``DIR/shard-000000.tar``, ... in the schema of `datamodules.schema` (inputs i*S..(i+1)*S-1
of the sorted input list go to shard i, S = --samples-per-shard; dropped inputs leave gaps), each
written as ``.tar.tmp`` and renamed when complete; ``DIR/manifest.json`` holds the settings, the
per-shard and total counts kept / dropped by reason, the completed shards and the throughput.
Re-running with the same settings skips completed shards; different settings are an error.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import json
import os
import re
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from datamodules.captions import VLMCaptioner, load_caption_table, lookup_caption
from datamodules.schema import Face, Sample, encode_sample
from src.faces import (
    DetectedFace,
    FaceDetector,
    UnreadableImageError,
    box_mask,
    crops_for,
    decode_rgb,
    detect_with_retry,
    load_rgb,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
REASONS = ("unreadable", "no_face", "low_confidence", "too_small", "too_few_faces", "too_many_faces")


class PrepareError(RuntimeError):
    """A problem with the inputs or the output directory; the message names the path at fault."""


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class PrepareConfig:
    """Everything that determines the output shards (stored in the manifest, checked on resume)."""

    input: str
    format: str
    out: str
    captions: str | None = None
    captioner: str | None = None
    captioner_prompt: str = "a photography of"
    min_faces: int = 1
    max_faces: int = 1
    min_face_size: float = 32.0
    min_prob: float = 0.9
    clip_size: int = 224
    samples_per_shard: int = 1000
    resolution_max: int = 1024
    pad_retry: float = 1.25
    landmark_fallback: bool = True
    shuffle: bool = False
    seed: int = 0
    device: str = "cpu"

    def content_settings(self) -> dict:
        """The settings that change shard contents (all but out and device)."""
        d = asdict(self)
        d.pop("out")
        d.pop("device")
        return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m datamodules.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="folder, .tar / directory / pattern of shards, or CelebA root")
    p.add_argument("--format", required=True, choices=("folder", "wds", "celeba"))
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--captions", default=None, help="JSONL caption table (key/image + caption/text)")
    p.add_argument("--captioner", default=None, help="local dir of a transformers image-to-text model")
    p.add_argument("--captioner-prompt", default="a photography of", help="prefix the captioner continues")
    p.add_argument("--min-faces", type=int, default=1, help="drop images with fewer kept faces")
    p.add_argument("--max-faces", type=int, default=1, help="drop images with more kept faces")
    p.add_argument("--min-face-size", type=float, default=32.0, help="min shorter box side, pixels")
    p.add_argument("--min-prob", type=float, default=0.9, help="min MTCNN detection probability")
    p.add_argument("--clip-size", type=int, default=224, help="side of the aligned CLIP crop")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="input images per output shard")
    p.add_argument("--resolution-max", type=int, default=1024, help="downscale so the longer side <= this")
    p.add_argument("--pad-retry", type=float, default=1.25, help="pad factor for a retry when no face (<=1: off)")
    p.add_argument(
        "--landmark-fallback", action=argparse.BooleanOptionalAction, default=True,
        help="celeba: use list_landmarks_align_celeba.txt when MTCNN finds no face",
    )
    p.add_argument("--shuffle", action="store_true", help="folder/celeba: seeded shuffle of the input order")
    p.add_argument("--seed", type=int, default=0, help="seed for --shuffle and torch")
    p.add_argument("--device", default="cpu", help="torch device for MTCNN and the captioner")
    return p


def parse_config(argv: list[str] | None = None) -> PrepareConfig:
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(**vars(args))
    # absolute paths, so that a resume from another working directory sees the same settings
    if cfg.format != "wds":  # a wds input may be a pattern, kept as given
        cfg.input = str(Path(cfg.input).expanduser().resolve())
    for name in ("captions", "captioner"):
        if getattr(cfg, name):
            setattr(cfg, name, str(Path(getattr(cfg, name)).expanduser().resolve()))
    validate_config(cfg)
    return cfg


def validate_config(cfg: PrepareConfig) -> None:
    """Raise PrepareError naming the first bad setting."""
    checks = [
        (cfg.samples_per_shard >= 1, "samples_per_shard", cfg.samples_per_shard),
        (cfg.min_faces >= 1, "min_faces", cfg.min_faces),
        (cfg.max_faces >= cfg.min_faces, "max_faces", cfg.max_faces),
        (cfg.clip_size >= 16, "clip_size", cfg.clip_size),
        (cfg.resolution_max >= 64, "resolution_max", cfg.resolution_max),
        (0.0 <= cfg.min_prob <= 1.0, "min_prob", cfg.min_prob),
    ]
    for ok, name, value in checks:
        if not ok:
            raise PrepareError(f"invalid --{name.replace('_', '-')}={value}")


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass
class SourceItem:
    """One input image, not yet decoded.

    key: source key (relative posix path for folder/celeba, "<tar name>/<__key__>" for wds).
    read: returns the uint8 (H, W, 3) image, raises UnreadableImageError naming the source.
    landmarks: optional (5, 2) annotated landmarks in source pixels (CelebA fallback).
    """

    key: str
    read: Callable[[], np.ndarray]
    identity: str | None = None
    text: str | None = None
    caption_keys: tuple[str, ...] = ()
    landmarks: np.ndarray | None = None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def list_folder(root: Path) -> list[SourceItem]:
    """Images under root, sorted by relative path; identity = first-level sub-folder name."""
    if not root.is_dir():
        raise PrepareError(f"{root}: --format folder needs a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    items = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        parts = PurePosixPath(rel).parts
        items.append(
            SourceItem(
                key=rel,
                read=lambda p=p: load_rgb(p),
                identity=parts[0] if len(parts) > 1 else None,
                text=_read_text(p.with_suffix(".txt")),
                caption_keys=(rel,),
            )
        )
    return items


def _celeba_table(path: Path, n_values: int, header_lines: int) -> dict[str, list[str]]:
    """CelebA annotation file -> {file name: values}. Errors name file and line."""
    table: dict[str, list[str]] = {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if lineno <= header_lines or not fields:
                continue
            if len(fields) != n_values + 1:
                raise PrepareError(f"{path}:{lineno}: expected {n_values + 1} fields, got {len(fields)}")
            table[fields[0]] = fields[1:]
    return table


def list_celeba(root: Path) -> list[SourceItem]:
    """CelebA layout -> items with identity labels and (optional) annotated landmarks."""
    img_dir = root / "img_align_celeba"
    if not img_dir.is_dir():
        raise PrepareError(f"{img_dir}: missing; --format celeba expects <root>/img_align_celeba/")
    ids_path = root / "identity_CelebA.txt"
    identities = _celeba_table(ids_path, 1, 0) if ids_path.is_file() else {}
    lm_path = root / "list_landmarks_align_celeba.txt"
    landmarks = _celeba_table(lm_path, 10, 2) if lm_path.is_file() else {}
    items = []
    for p in sorted(q for q in img_dir.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS):
        lm = landmarks.get(p.name)
        try:
            lm_arr = np.asarray(lm, dtype=np.float32).reshape(5, 2) if lm else None
        except ValueError as e:
            raise PrepareError(f"{lm_path}: non-numeric landmarks for {p.name}") from e
        ident = identities.get(p.name)
        items.append(
            SourceItem(
                key=p.name,
                read=lambda p=p: load_rgb(p),
                identity=ident[0] if ident else None,
                caption_keys=(p.name, f"img_align_celeba/{p.name}"),
                landmarks=lm_arr,
            )
        )
    return items


def resolve_tars(spec: str) -> list[Path]:
    """A .tar file, a directory of .tar files, or a glob / brace pattern -> sorted tar paths."""
    import braceexpand

    path = Path(spec)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
    else:
        tars = sorted({Path(m) for pat in braceexpand.braceexpand(spec) for m in glob.glob(pat)})
    if not tars:
        raise PrepareError(f"{spec}: no .tar shards found")
    return tars


def _split_member(name: str) -> tuple[str, str]:
    """webdataset naming: "dir/key.ext.ext2" -> ("dir/key", "ext.ext2")."""
    m = re.match(r"^((?:.*/|)[^./]+)\.([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


def _tar_groups(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) groups of consecutive members sharing a key."""
    try:
        with tarfile.open(tar_path, "r|*") as tf:
            key, group = None, {}
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_member(member.name)
                if key is not None and k != key:
                    yield key, group
                    group = {}
                key = k
                group[ext] = tf.extractfile(member).read()
            if key is not None:
                yield key, group
    except tarfile.TarError as e:
        raise PrepareError(f"{tar_path}: unreadable tar ({e})") from e


def _wds_text(group: dict[str, bytes]) -> str | None:
    if "txt" in group:
        text = group["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return text
    if "json" in group:
        try:
            caption = json.loads(group["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, str) and caption.strip():
            return caption.strip()
    return None


def _wds_reader(data: bytes | None, source: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        if data is None:
            raise UnreadableImageError(f"{source}: sample has no image field ({', '.join(WDS_IMAGE_FIELDS)})")
        return decode_rgb(data, source)

    return read


def iter_wds(spec: str) -> Iterator[SourceItem]:
    """Stream img2dataset-style samples from tar shards, in file then member order."""
    for tar_path in resolve_tars(spec):
        for key, group in _tar_groups(tar_path):
            data = next((group[e] for e in WDS_IMAGE_FIELDS if e in group), None)
            source = f"{tar_path.name}/{key}"
            yield SourceItem(
                key=source,
                read=_wds_reader(data, f"{tar_path}:{key}"),
                text=_wds_text(group),
                caption_keys=(key, source),
            )


def enumerate_inputs(cfg: PrepareConfig) -> tuple[int | None, Iterable[SourceItem]]:
    """(total or None when streamed, items in their deterministic order)."""
    root = Path(cfg.input)
    if cfg.format == "wds":
        return None, iter_wds(cfg.input)
    items = list_folder(root) if cfg.format == "folder" else list_celeba(root)
    if not items:
        raise PrepareError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(items))
        items = [items[i] for i in order]
    return len(items), items


# ----------------------------------------------------------------------------------------------
# One image


@dataclass
class Outcome:
    """Result of processing one input: a sample, or the reason it was dropped."""

    sample: Sample | None = None
    reason: str | None = None
    landmark_fallback: bool = False


def limit_resolution(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale (H, W, 3) so max(H, W) <= max_side; returns the image and the scale applied."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)), scale


def select_faces(faces: list[DetectedFace], cfg: PrepareConfig) -> tuple[list[DetectedFace], str | None]:
    """Apply the filters to raw detections (largest first): (kept faces, None) or ([], reason)."""
    if not faces:
        return [], "no_face"
    confident = [f for f in faces if f.prob >= cfg.min_prob]
    if not confident:
        return [], "low_confidence"
    large = [f for f in confident if f.short_side >= cfg.min_face_size]
    if not large:
        return [], "too_small"
    if len(large) < cfg.min_faces:
        return [], "too_few_faces"
    if len(large) > cfg.max_faces:
        return [], "too_many_faces"
    return large, None


def face_from_landmarks(landmarks: np.ndarray, h: int, w: int) -> DetectedFace:
    """Annotated (5, 2) landmarks -> a face whose box is a square around them (prob 1.0).

    The square is centred on the landmarks' mean with side 2x their largest extent (eye-to-mouth
    spans about half a face), clipped to the image.
    """
    lm = np.asarray(landmarks, dtype=np.float32)
    centre = lm.mean(0)
    half = float(np.max(lm.max(0) - lm.min(0)))  # side 2 * extent -> half-side = extent
    box = np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half], np.float32)
    return DetectedFace(box, lm, 1.0).clipped(h, w)


def default_caption(n_faces: int) -> str:
    return "a photo of a person" if n_faces == 1 else f"a photo of {n_faces} people"


@dataclass
class CaptionSources:
    table: dict[str, str] = field(default_factory=dict)
    captioner: Callable[[np.ndarray], str] | None = None

    def caption(self, item: SourceItem, image: np.ndarray, n_faces: int) -> str:
        """JSONL table, then the captioner, then the source text, then the default template."""
        found = lookup_caption(self.table, *item.caption_keys) if self.table else None
        if found:
            return found
        if self.captioner is not None:
            generated = self.captioner(image).strip()
            if generated:
                return generated
        return item.text or default_caption(n_faces)


def sample_key(index: int, source_key: str) -> str:
    """Unique, webdataset-safe key (no dots, no slashes): "000000012_alice_001"."""
    stem = str(PurePosixPath(source_key).with_suffix("")) if "." in source_key else source_key
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[-48:]
    return f"{index:09d}_{slug}" if slug else f"{index:09d}"


def build_sample(
    index: int, item: SourceItem, image: np.ndarray, faces: list[DetectedFace], caption: str, clip_size: int
) -> Sample:
    """Crops, box masks and schema faces for the kept faces of one image."""
    h, w = image.shape[:2]
    crops = [crops_for(image, f, clip_size) for f in faces]
    schema_faces = [
        Face(
            box=[float(v) for v in f.box],
            landmarks=[[float(x), float(y)] for x, y in f.landmarks],
            prob=float(f.prob),
            identity=item.identity if i == 0 else None,
        )
        for i, f in enumerate(faces)
    ]
    return Sample(
        key=sample_key(index, item.key),
        image=image,
        caption=caption,
        faces=schema_faces,
        masks=np.stack([box_mask(h, w, f.box) for f in faces]),  # (N, H, W)
        recog=np.stack([c[0] for c in crops]),  # (N, 112, 112, 3)
        clip=np.stack([c[1] for c in crops]),  # (N, S, S, 3)
        source=item.key,
    )


def process_item(
    index: int, item: SourceItem, detector: FaceDetector, captions: CaptionSources, cfg: PrepareConfig
) -> Outcome:
    """Decode, detect, filter, align and caption one input."""
    try:
        image = item.read()
    except UnreadableImageError:
        return Outcome(reason="unreadable")
    image, scale = limit_resolution(image, cfg.resolution_max)
    faces, reason = select_faces(detect_with_retry(image, detector, cfg.pad_retry, filtered=False), cfg)
    fallback = False
    if reason == "no_face" and cfg.landmark_fallback and item.landmarks is not None:
        faces, reason, fallback = [face_from_landmarks(item.landmarks * scale, *image.shape[:2])], None, True
    if reason is not None:
        return Outcome(reason=reason)
    caption = captions.caption(item, image, len(faces))
    return Outcome(sample=build_sample(index, item, image, faces, caption, cfg.clip_size), landmark_fallback=fallback)


# ----------------------------------------------------------------------------------------------
# Shards and manifest


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def new_manifest(cfg: PrepareConfig) -> dict:
    return {"settings": cfg.content_settings(), "shards": {}, "completed_shards": [], "finished": False}


def load_manifest(out: Path, cfg: PrepareConfig) -> dict:
    """The existing manifest (checked against cfg) or a new one."""
    path = out / MANIFEST
    if not path.is_file():
        return new_manifest(cfg)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PrepareError(f"{path}: unreadable manifest ({e}); remove it to start over") from e
    old, new = manifest.get("settings", {}), cfg.content_settings()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise PrepareError(f"{path}: settings differ from the run that made this directory ({diffs}); use a new --out")
    return manifest


def summarise(manifest: dict) -> None:
    """Recompute the totals from the per-shard entries (in place)."""
    shards = manifest["shards"]
    dropped: Counter = Counter()
    for s in shards.values():
        dropped.update(s["dropped"])
    manifest["completed_shards"] = sorted(shards)
    manifest["inputs"] = sum(s["inputs"] for s in shards.values())
    manifest["kept"] = sum(s["kept"] for s in shards.values())
    manifest["landmark_fallback"] = sum(s["landmark_fallback"] for s in shards.values())
    manifest["dropped"] = {r: dropped.get(r, 0) for r in sorted(set(REASONS) | set(dropped))}


def keys_digest(keys: Iterable[str]) -> str:
    h = hashlib.sha1()
    for k in keys:
        h.update(k.encode("utf-8") + b"\0")
    return h.hexdigest()


class ShardRun:
    """Writes one shard through a temporary name; renamed only by `commit`."""

    def __init__(self, out: Path, name: str) -> None:
        self.final = out / name
        self.tmp = out / (name + ".tmp")
        self.writer = wds.TarWriter(str(self.tmp), encoder=False)
        self.stats = {"inputs": 0, "kept": 0, "dropped": Counter(), "landmark_fallback": 0}
        self.keys: list[str] = []

    def add(self, key: str, outcome: Outcome) -> None:
        self.keys.append(key)
        self.stats["inputs"] += 1
        if outcome.sample is None:
            self.stats["dropped"][outcome.reason] += 1
            return
        self.writer.write(encode_sample(outcome.sample))
        self.stats["kept"] += 1
        self.stats["landmark_fallback"] += int(outcome.landmark_fallback)

    def commit(self) -> dict:
        self.writer.close()
        os.replace(self.tmp, self.final)
        return {**self.stats, "dropped": dict(self.stats["dropped"]), "keys_sha1": keys_digest(self.keys)}

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def check_completed(out: Path, name: str, entry: dict, keys: list[str]) -> None:
    """A completed shard's inputs must be the same as when it was written."""
    if keys_digest(keys) != entry["keys_sha1"]:
        raise PrepareError(
            f"{out / name}: its inputs changed since it was written ({len(keys)} inputs now, "
            f"{entry['inputs']} then); use a new --out"
        )


# ----------------------------------------------------------------------------------------------
# Driver


@dataclass
class Runtime:
    """Lazily built heavy objects (not needed when every shard is already complete)."""

    cfg: PrepareConfig
    table: dict[str, str] = field(default_factory=dict)
    _detector: FaceDetector | None = None
    _captions: CaptionSources | None = None

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = FaceDetector(min_prob=0.0, min_size=0.0, device=self.cfg.device)
        return self._detector

    @property
    def captions(self) -> CaptionSources:
        if self._captions is None:
            captioner = (
                VLMCaptioner(self.cfg.captioner, prompt=self.cfg.captioner_prompt, device=self.cfg.device)
                if self.cfg.captioner
                else None
            )
            self._captions = CaptionSources(self.table, captioner)
        return self._captions


def write_shard(
    out: Path, name: str, slot: Iterable[tuple[int, SourceItem]], rt: Runtime, bar: tqdm
) -> tuple[dict, int]:
    """Process the inputs of one shard slot (streamed) and write it; returns (manifest entry, inputs)."""
    run = ShardRun(out, name)
    try:
        for index, item in slot:
            run.add(item.key, process_item(index, item, rt.detector, rt.captions, rt.cfg))
            bar.update(1)
        return run.commit(), run.stats["inputs"]
    except BaseException:
        run.abort()
        raise


def prepare(cfg: PrepareConfig) -> dict:
    """Run the preparation (resuming in cfg.out) and return the manifest."""
    validate_config(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out, cfg)
    manifest["finished"] = False
    table = load_caption_table(cfg.captions) if cfg.captions else {}  # a bad file fails before detection
    total, items = enumerate_inputs(cfg)
    rt = Runtime(cfg, table)
    processed, seconds = 0, 0.0
    with tqdm(total=total, unit="img", desc="prepare", dynamic_ncols=True) as bar:
        slots = itertools.groupby(enumerate(items), key=lambda t: t[0] // cfg.samples_per_shard)
        seen: set[str] = set()
        for shard_index, slot in slots:
            name = SHARD_PATTERN.format(shard_index)
            seen.add(name)
            entry = manifest["shards"].get(name)
            if entry is not None and (out / name).is_file():
                keys = [it.key for _, it in slot]  # completed: read keys only, decode nothing
                check_completed(out, name, entry, keys)
                bar.update(len(keys))
                continue
            _ = rt.detector  # build the model outside the timed region
            t0 = time.perf_counter()
            manifest["shards"][name], n = write_shard(out, name, slot, rt, bar)
            seconds += time.perf_counter() - t0
            processed += n
            summarise(manifest)
            _write_json_atomic(out / MANIFEST, manifest)
    stale = sorted(set(manifest["shards"]) - seen)
    if stale:
        raise PrepareError(f"{out / MANIFEST}: lists {stale} but the inputs now fill fewer shards; use a new --out")
    summarise(manifest)
    rate = processed / seconds if seconds > 0 else 0.0
    manifest["throughput"] = {
        "images": processed,
        "seconds": round(seconds, 3),
        "images_per_s": round(rate, 3),
        "torch_threads": torch.get_num_threads(),
    }
    manifest["finished"] = True
    _write_json_atomic(out / MANIFEST, manifest)
    print(
        f"prepared {manifest['kept']} of {manifest['inputs']} images into {len(manifest['shards'])} shard(s) "
        f"in {out}; dropped {manifest['dropped']}; this run: {processed} images, {rate:.2f} images/s"
    )
    return manifest


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point; returns the manifest."""
    return prepare(parse_config(argv))


if __name__ == "__main__":
    main()
