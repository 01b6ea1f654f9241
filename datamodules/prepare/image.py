"""One input image of the preparation: decode, limit its resolution, detect and select faces (or fall back on
annotated landmarks), caption, and build the schema Sample with its crops and masks (`process_item`).
`decode_and_detect` does the first two steps for a chunk of inputs at once (MTCNN batched)."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from datamodules.captions import lookup_caption
from datamodules.prepare.config import PrepareConfig
from datamodules.prepare.sources import SourceItem
from datamodules.schema import Face, Sample
from src.faces import (
    DetectedFace,
    FaceDetector,
    ImageTooSmallError,
    UnreadableImageError,
    box_mask,
    crops_for,
    detect_with_retry,
)

REASONS = ("unreadable", "image_too_small", "no_face", "low_confidence", "too_small", "too_few_faces", "too_many_faces")


@dataclass
class Outcome:
    """Result of processing one input: a sample, or the reason it was dropped."""

    sample: Sample | None = None
    reason: str | None = None
    landmark_fallback: bool = False


@dataclass
class Decoded:
    """One input after decoding, the resolution limit and the first detection (not yet retried or filtered).

    image: uint8 (H, W, 3) after --resolution-max, None when dropped; scale: the factor applied;
    faces: raw detections in image pixels; reason: "unreadable" or "image_too_small" when dropped.
    """

    image: np.ndarray | None
    scale: float = 1.0
    faces: list[DetectedFace] = field(default_factory=list)
    reason: str | None = None


def decode_and_detect(items: list[SourceItem], detector: FaceDetector, cfg: PrepareConfig) -> list[Decoded]:
    """Decode and limit the resolution of a chunk of inputs, then detect faces in all of them at once
    (`FaceDetector.detect_raw_batch`: equal-size detection copies share one MTCNN batch)."""
    decoded: list[Decoded] = []
    for item in items:
        try:
            image, scale = limit_resolution(item.read(), cfg.resolution_max)
            detector.check_size(image, item.key)
        except UnreadableImageError:
            decoded.append(Decoded(None, reason="unreadable"))
            continue
        except ImageTooSmallError:
            decoded.append(Decoded(None, reason="image_too_small"))
            continue
        decoded.append(Decoded(image, scale))
    todo = [d for d in decoded if d.image is not None]
    for d, faces in zip(todo, detector.detect_raw_batch([d.image for d in todo])):
        d.faces = faces
    return decoded


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
    index: int,
    item: SourceItem,
    detector: FaceDetector,
    captions: CaptionSources,
    cfg: PrepareConfig,
    decoded: Decoded | None = None,
) -> Outcome:
    """Decode, detect, filter, align and caption one input; `decoded`: its `decode_and_detect` result when
    made already (in a chunk), else made here."""
    if decoded is None:
        decoded = decode_and_detect([item], detector, cfg)[0]
    if decoded.reason is not None:
        return Outcome(reason=decoded.reason)
    image, scale = decoded.image, decoded.scale
    raw = detect_with_retry(image, detector, cfg.pad_retry, filtered=False, first=decoded.faces)
    faces, reason = select_faces(raw, cfg)
    fallback = False
    if reason == "no_face" and cfg.landmark_fallback and item.landmarks is not None:
        faces, reason, fallback = [face_from_landmarks(item.landmarks * scale, *image.shape[:2])], None, True
    if reason is not None:
        return Outcome(reason=reason)
    caption = captions.caption(item, image, len(faces))
    return Outcome(sample=build_sample(index, item, image, faces, caption, cfg.clip_size), landmark_fallback=fallback)
