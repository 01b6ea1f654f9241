"""Request handling of the web demo: uploaded files -> identities -> the pipeline's `__call__` -> gallery items.

Every user error (an empty prompt, a photo without a face, a file that is not an image, too many people, weights
that cannot route several people) becomes a message for the page instead of an exception, so one bad request
never stops the app. Faces are found with the helpers of `src.faces` (largest face, aligned crops) and the
pipeline's own detector, once per upload (the preview and the generation share the result), and the crops go
to the pipeline as `Identity.from_crops`: what the preview shows is exactly what conditions the generator.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from src.conventions import CLIP_CROP_SIZE
from src.faces import NoFaceError, UnreadableImageError, crops_for, decode_rgb, largest_face, same_size_crops
from src.inference.io import PALETTE, routing_colours
from src.inference.loading import LoadedPipeline
from src.inference.pipeline import SCHEDULERS, Identity, PipelineOutput

log = logging.getLogger(__name__)

MAX_PEOPLE = 4  # the released demo's multi-ID tab
MAX_IMAGES = 4
PHOTOS, CROPS = "photos", "crops"  # what the uploads are: photos (the largest face is found) or aligned face crops
USER_ERRORS = (NoFaceError, UnreadableImageError, FileNotFoundError, KeyError, ValueError)
OVERLAY_ALPHA = 0.5  # weight of the identity colour over the generated image in the routing overlays

GalleryItem = tuple[Image.Image, str]


@dataclass
class Settings:
    """The generation settings of one request (the pipeline's `__call__` arguments, same defaults)."""

    prompt: str
    negative_prompt: str = ""
    face_scale: float = 0.7
    structure_scale: float | None = None  # None: 0.1 for one person, 0.3 for several (the pipeline's default)
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    num_images: int = 1

    def check(self) -> None:
        """A ValueError naming the first setting out of range (the page shows it)."""
        if not self.prompt or not self.prompt.strip():
            raise ValueError("the prompt is empty: describe the picture to generate")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not one of {sorted(SCHEDULERS)}")
        if int(self.steps) < 1:
            raise ValueError(f"steps = {self.steps}: at least 1")
        if not 1 <= int(self.num_images) <= MAX_IMAGES:
            raise ValueError(f"number of images = {self.num_images}: between 1 and {MAX_IMAGES}")


@dataclass
class Result:
    """What one request shows: generated images, routing overlays, the colour legend and a message."""

    images: list[GalleryItem] = field(default_factory=list)
    routing: list[GalleryItem] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)  # (person label, hex colour)
    message: str = ""
    ok: bool = False


@dataclass(frozen=True)
class FaceCrops:
    """One upload's face: aligned crops (uint8 recognition (112, 112, 3) and CLIP (S, S, 3)) and, for a photo,
    the photo with the detected box and landmarks drawn."""

    name: str
    recog: np.ndarray
    clip: np.ndarray
    marked: Image.Image | None


def file_paths(files: Any) -> list[Path]:
    """The upload paths gradio hands over (None, one path, or a list of paths / file objects with `.name`)."""
    if files is None:
        return []
    if isinstance(files, (str, Path)) or hasattr(files, "name"):
        files = [files]
    return [Path(f) if isinstance(f, (str, Path)) else Path(f.name) for f in files]


def upload_name(path: Path) -> str:
    """The name the user gave the file (gradio keeps it as the last part of its upload path)."""
    return path.name


def hex_colour(n: int) -> str:
    """Person n's colour (the routing-map PNGs' palette, `src.inference.io.PALETTE`) as #rrggbb."""
    r, g, b = (int(v) for v in PALETTE[n % len(PALETTE)])
    return f"#{r:02x}{g:02x}{b:02x}"


def overlay(image: Image.Image, hard: torch.Tensor, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The image with each position tinted by the identity routed there (nearest-neighbour upsampling of the
    (N, h, w) map to the image size; positions no identity claims keep the image's own pixels)."""
    colour, claimed = routing_colours(hard)
    w, h = image.size
    colour_big = np.asarray(Image.fromarray(colour).resize((w, h), Image.NEAREST), dtype=np.float32)  # (H, W, 3)
    claimed_big = np.asarray(Image.fromarray(claimed.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    base = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    mixed = np.where(claimed_big[..., None], (1 - alpha) * base + alpha * colour_big, base)
    return Image.fromarray(np.round(mixed).astype(np.uint8))


def routing_overlays(out: PipelineOutput) -> list[GalleryItem]:
    """Per generated image: the majority over all layers first, then every cross-attention layer's routing."""
    maps = out.routing_maps or []
    items: list[GalleryItem] = []
    for i, image in enumerate(out.images):
        if not maps:
            break
        w, h = image.size
        votes = sum(torch.nn.functional.interpolate(m.hard[i][None].float(), size=(h, w), mode="nearest")[0]
                    for m in maps)  # (N, H, W): layers routing each pixel to each identity
        majority = torch.nn.functional.one_hot(votes.argmax(0), votes.shape[0]).permute(2, 0, 1)  # (N, H, W)
        majority = majority * (votes.sum(0) > 0)
        items.append((overlay(image, majority), f"image {i + 1}: all layers"))
        items += [(overlay(image, m.hard[i]), f"image {i + 1}: {short_layer_name(m.name)}") for m in maps]
    return items


def short_layer_name(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2' -> 'down 1.0' (mid, up alike)."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return f"mid {parts[2]}" if len(parts) > 2 else "mid"
    if len(parts) >= 4 and parts[0].endswith("_blocks"):
        return f"{parts[0].removesuffix('_blocks')} {parts[1]}.{parts[3]}"
    return name


def mark_face(image: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> Image.Image:
    """The photo with the detected box and its five landmarks drawn (the preview of a photo upload)."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    line = max(2, round(max(img.size) / 200))
    draw.rectangle([float(v) for v in box], outline=(0, 200, 90), width=line)
    for x, y in landmarks:
        draw.ellipse([x - line, y - line, x + line, y + line], fill=(255, 200, 0))
    return img


class Demo:
    """The loaded pipeline and everything a request does with it (the gradio callbacks call these methods).

    upload_kind: the default meaning of uploads, PHOTOS or CROPS (aligned face crops, as `generate --face-crop`).
    """

    def __init__(self, loaded: LoadedPipeline, upload_kind: str = PHOTOS, cache_size: int = 64) -> None:
        if upload_kind not in (PHOTOS, CROPS):
            raise ValueError(f"upload kind {upload_kind!r} is not {PHOTOS!r} or {CROPS!r}")
        self.loaded = loaded
        self.pipeline = loaded.pipeline
        self.upload_kind = upload_kind
        self._faces: OrderedDict[tuple[str, str, float], FaceCrops] = OrderedDict()
        self._cache_size = cache_size

    # ------------------------------------------------------------------ faces of the uploads
    def face(self, path: Path, kind: str) -> FaceCrops:
        """The face of one upload: the largest detected face of a photo (the pipeline's detector, aligned
        crops of `src.faces.crops_for`) or the aligned crop itself. Errors name the upload."""
        if kind not in (PHOTOS, CROPS):
            raise ValueError(f"upload kind {kind!r} is not {PHOTOS!r} or {CROPS!r}")
        name = upload_name(path)
        if not path.is_file():
            raise UnreadableImageError(f"{name}: the upload is gone (upload it again)")
        key = (str(path), kind, path.stat().st_mtime)
        if key in self._faces:
            self._faces.move_to_end(key)
            return self._faces[key]
        image = decode_rgb(path.read_bytes(), source=name)  # (H, W, 3) uint8
        if kind == CROPS:
            if image.shape[0] != image.shape[1]:
                raise ValueError(f"{name}: an aligned face crop is square, this is {image.shape[1]}x{image.shape[0]} "
                                 f"(choose '{PHOTOS}' to find the face in a photo)")
            found = FaceCrops(name, image, image, None)
        else:
            face = largest_face(image, self.pipeline.detector, source=name)
            recog, clip = crops_for(image, face, clip_size=CLIP_CROP_SIZE)
            found = FaceCrops(name, recog, clip, mark_face(image, face.box, face.landmarks))
        self._faces[key] = found
        while len(self._faces) > self._cache_size:
            self._faces.popitem(last=False)
        return found

    def person(self, files: Any, kind: str, who: str) -> Identity:
        """One person from their uploads (several are several references of the same person)."""
        paths = file_paths(files)
        if not paths:
            raise ValueError(f"{who}: upload at least one photo")
        faces = [self.face(p, kind) for p in paths]
        if kind == CROPS:  # one person's crops are stacked: one size, the largest
            return Identity.from_crops(same_size_crops([f.recog for f in faces], [f.name for f in faces]))
        return Identity.from_crops([f.recog for f in faces], [f.clip for f in faces])

    def preview(self, files: Any, kind: str, who: str = "person") -> tuple[list[GalleryItem], str]:
        """The detected face of every upload (the photo with its box and the aligned crop) and a message
        naming any upload without a usable face."""
        items: list[GalleryItem] = []
        problems = []
        for path in file_paths(files):
            try:
                face = self.face(path, kind)
            except USER_ERRORS as err:
                problems.append(f"{who}: {message_of(err)}")
                continue
            if face.marked is not None:
                items.append((face.marked, f"{face.name}: detected face"))
            items.append((Image.fromarray(face.recog), f"{face.name}: aligned crop"))
        return items, "\n\n".join(f"⚠ {p}" for p in problems)

    # ------------------------------------------------------------------ generation
    def single(self, files: Any, partner_files: Any, partner_weight: float, kind: str, settings: Settings,
               progress: bool = False) -> Result:
        """One person from several references, optionally interpolated with a second person: identity
        tokens (1 - w) * person + w * partner (the pipeline's `Identity.mix`)."""
        def identities() -> list[Identity]:
            person = self.person(files, kind, "the person")
            if file_paths(partner_files) and partner_weight > 0:
                if not 0 <= partner_weight <= 1:
                    raise ValueError(f"interpolation weight {partner_weight}: between 0 and 1")
                person.mix = [(self.person(partner_files, kind, "the second person"), float(partner_weight))]
            return [person]

        return self._generate(identities, settings, progress)

    def several(self, files: Any, kind: str, settings: Settings, progress: bool = False) -> Result:
        """Up to MAX_PEOPLE people, one upload each, in order (person 1 is the first file)."""
        def identities() -> list[Identity]:
            paths = file_paths(files)
            if len(paths) > MAX_PEOPLE:
                raise ValueError(f"{len(paths)} people uploaded: at most {MAX_PEOPLE} (one photo per person)")
            if not paths:
                raise ValueError(f"upload one photo per person (1 to {MAX_PEOPLE} people)")
            return [self.person([p], kind, f"person {i + 1}") for i, p in enumerate(paths)]

        return self._generate(identities, settings, progress)

    def _generate(self, identities: Any, settings: Settings, progress: bool) -> Result:
        """Check the settings, read the people (`identities()`), run the pipeline; any user error -> message."""
        t0 = time.time()
        try:
            settings.check()
            people = identities()
            out = self.pipeline(
                settings.prompt, people, negative_prompt=settings.negative_prompt,
                faceid_scale=float(settings.face_scale), structure_scale=settings.structure_scale,
                guidance_scale=float(settings.guidance), num_inference_steps=int(settings.steps),
                scheduler=settings.scheduler, seed=int(settings.seed), num_images=int(settings.num_images),
                return_routing_maps=len(people) > 1, progress=progress,
            )
        except USER_ERRORS as err:
            return Result(message=f"⚠ Could not generate: {message_of(err)}")
        except Exception as err:  # noqa: BLE001 - the app stays up; the traceback goes to the log
            log.exception("generation failed")
            return Result(message=f"⚠ generation failed ({type(err).__name__}: {err}); see the app's log")
        n = len(people)
        images = [(img, f"image {i + 1} · seed {settings.seed}") for i, img in enumerate(out.images)]
        legend = [(f"person {i + 1}", hex_colour(i)) for i in range(n)] if n > 1 else []
        secs = time.time() - t0
        return Result(images, routing_overlays(out) if n > 1 else [], legend,
                      f"✓ {len(images)} image(s) of {n} {'person' if n == 1 else 'people'} in {secs:.1f} s "
                      f"({settings.steps} {settings.scheduler} steps, seed {settings.seed})", ok=True)


def message_of(err: BaseException) -> str:
    """The user-facing text of an error (a KeyError's message without its quotes)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)

