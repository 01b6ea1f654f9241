"""Face detection, largest-face selection, aligned crops and box masks for real photographs.

Shared by `datamodules.prepare` (shard preparation), the inference pipeline and the metrics.

Detection uses facenet-pytorch's MTCNN (its P/R/O-net weights ship inside the wheel, nothing is
downloaded). It runs on a copy whose longer side is capped at `FaceDetector.detect_size` (640 px by
default, like insightface's detector; 0 = full resolution) and maps boxes and landmarks back, so
coordinates are always pixels of the image given to `detect`; boxes are ``[x0, y0, x1, y1]``
and the five landmarks follow `src.conventions.ARCFACE_TEMPLATE_112`'s order: left eye, right eye,
nose, left mouth corner, right mouth corner, where left/right are the image's left/right.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from src.alignment import align_face
from src.conventions import CLIP_CROP_SIZE, FACE_RECOG_SIZE


class NoFaceError(ValueError):
    """No face was found in an image; the message names the image's source."""


class UnreadableImageError(ValueError):
    """A file or byte string that is not a readable image; the message names the source."""


class ImageTooSmallError(NoFaceError):
    """An image whose shorter side is below MTCNN's minimum face size: it cannot hold a detectable face.

    A NoFaceError, so that callers reporting "no face" report this too; the message names the source.
    """


DEFAULT_DETECT_SIZE = 640


class ChannelsLast(torch.nn.Module):
    """A network run on a channels-last copy of its input.

    facenet-pytorch's `detect_face` hands R-Net and O-Net their candidate crops as one contiguous (N, 3, S, S)
    batch; PyTorch's CPU max-pooling is several times slower on that layout than on channels-last (P-Net's
    pyramid levels are channels-last already, so for it this is a no-op). The convolutions' summation order can
    change, so detections move in their last float bits (~1e-4 px).
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(x.contiguous(memory_format=torch.channels_last))


@dataclass(frozen=True)
class DetectedFace:
    """One detected face.

    box: float32 (4,) ``[x0, y0, x1, y1]`` in pixels.
    landmarks: float32 (5, 2) ``(x, y)``: left eye, right eye, nose, left mouth, right mouth.
    prob: detection probability in [0, 1].
    """

    box: np.ndarray
    landmarks: np.ndarray
    prob: float

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def short_side(self) -> float:
        """The box's shorter side in pixels (what `min_size` filters on)."""
        return min(self.width, self.height)

    def shifted(self, dx: float, dy: float) -> DetectedFace:
        """The same face with coordinates translated by (dx, dy)."""
        off = np.array([dx, dy], dtype=np.float32)
        return DetectedFace(self.box + np.tile(off, 2), self.landmarks + off, self.prob)

    def clipped(self, h: int, w: int) -> DetectedFace:
        """The same face with its box clipped to an (h, w) image (landmarks untouched)."""
        box = np.clip(self.box, 0, [w, h, w, h]).astype(np.float32)
        return DetectedFace(box, self.landmarks, self.prob)


def _as_uint8_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what}: expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    return image


def sort_by_area(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Largest box first; ties keep the detector's order."""
    return sorted(faces, key=lambda f: -f.area)


def filter_faces(faces: list[DetectedFace], min_prob: float = 0.0, min_size: float = 0.0) -> list[DetectedFace]:
    """Faces with prob >= min_prob and a box whose shorter side is >= min_size pixels."""
    return [f for f in faces if f.prob >= min_prob and f.short_side >= min_size]


def detection_scale(h: int, w: int, detect_size: int, min_side: int) -> float:
    """The factor (<= 1) that caps max(h, w) at detect_size without taking min(h, w) below min_side.

    detect_size <= 0 means full resolution (1.0).
    """
    if detect_size <= 0 or max(h, w) <= detect_size:
        return 1.0
    return min(1.0, max(detect_size / max(h, w), min_side / min(h, w)))


class FaceDetector:
    """MTCNN face detector (facenet-pytorch, keep_all=True), CPU by default.

    Args:
        min_prob: faces below this detection probability are dropped by `detect`.
        min_size: faces whose box's shorter side is below this many pixels are dropped by `detect`.
        device: torch device for the three MTCNN networks.
        mtcnn_min_face_size: smallest face MTCNN's image pyramid searches for (pixels of the detection
            copy: with downscaling, faces below about mtcnn_min_face_size / scale full-resolution pixels).
        thresholds: MTCNN's P/R/O-net score thresholds.
        detect_size: detect on a copy whose longer side is at most this many pixels (bilinear, antialiased),
            mapping boxes and landmarks back; 0 detects at full resolution.
        channels_last: run the three networks on channels-last inputs (`ChannelsLast`: faster, the same
            detections up to float rounding); False runs facenet-pytorch's `detect_face` exactly as shipped.
    """

    def __init__(
        self,
        min_prob: float = 0.9,
        min_size: float = 0.0,
        device: str | torch.device = "cpu",
        mtcnn_min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        detect_size: int = DEFAULT_DETECT_SIZE,
        channels_last: bool = True,
    ) -> None:
        from facenet_pytorch import MTCNN  # heavy import kept local to the detector

        self.min_prob = float(min_prob)
        self.min_size = float(min_size)
        self.device = torch.device(device)
        self.detect_size = int(detect_size)
        self.channels_last = bool(channels_last)
        self.mtcnn = MTCNN(
            keep_all=True,
            select_largest=True,
            min_face_size=mtcnn_min_face_size,
            thresholds=list(thresholds),
            device=self.device,
        ).eval()
        # the three networks behind channels-last inputs, wrapped once (the wrappers share their weights)
        self._channels_last_nets = tuple(ChannelsLast(n) for n in (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet))

    @property
    def min_image_side(self) -> int:
        """The shortest image side MTCNN can search (its minimum face size); smaller images hold no face."""
        return int(np.ceil(self.mtcnn.min_face_size))

    def check_size(self, image: np.ndarray, source: str = "<image>") -> None:
        """Raise ImageTooSmallError naming `source` when the image is too small to hold a detectable face."""
        h, w = np.shape(image)[:2]
        if min(h, w) < self.min_image_side:
            raise ImageTooSmallError(
                f"{source}: image of {w}x{h} px is too small to hold a face (MTCNN's minimum face size is "
                f"{self.min_image_side} px)"
            )

    def _detection_copy(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(the copy MTCNN runs on, x factor, y factor mapping its pixels back to the image's)."""
        h, w = image.shape[:2]
        scale = detection_scale(h, w, self.detect_size, self.min_image_side)
        if scale == 1.0:
            return image, 1.0, 1.0
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        return small, w / size[0], h / size[1]

    def _mtcnn(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """MTCNN on a uint8 (B, H, W, 3) batch: per image ((F, 5) boxes + prob, (F, 5, 2) landmarks)."""
        from facenet_pytorch.models.utils.detect_face import detect_face

        m = self.mtcnn
        nets = self._channels_last_nets if self.channels_last else (m.pnet, m.rnet, m.onet)
        with torch.no_grad():
            boxes, points = detect_face(batch, m.min_face_size, *nets, m.thresholds, m.factor, m.device)
        # object arrays (facenet-pytorch 2.5.3 with numpy 2): convert each image's entries explicitly
        return [(np.asarray(boxes[i].tolist(), dtype=np.float32).reshape(-1, 5),  # (F, 5)
                 np.asarray(points[i].tolist(), dtype=np.float32).reshape(-1, 5, 2))  # (F, 5, 2)
                for i in range(len(batch))]

    @staticmethod
    def _faces(boxes: np.ndarray, points: np.ndarray, sx: float, sy: float) -> list[DetectedFace]:
        """Detections of a copy -> faces in image pixels, largest first (MTCNN's select_largest order)."""
        order = np.argsort((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[::-1]
        boxes, points = boxes[order], points[order]
        if (sx, sy) != (1.0, 1.0):
            boxes = np.concatenate([boxes[:, :4] * np.float32([sx, sy, sx, sy]), boxes[:, 4:]], axis=1)
            points = points * np.float32([sx, sy])
        faces = [DetectedFace(b[:4].copy(), p, float(b[4])) for b, p in zip(boxes, points)]
        return sort_by_area(faces)

    def detect_raw_batch(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """`detect_raw` of several uint8 (H, W, 3) images; those whose detection copies have the same size
        go through MTCNN as one batch (fewer, larger network calls; the same detections as one at a time up to
        float rounding, so a batch's composition can change the last bits)."""
        images = [_as_uint8_rgb(im) for im in images]
        for im in images:
            self.check_size(im)
        copies = [self._detection_copy(im) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (small, _, _) in enumerate(copies):
            groups.setdefault(small.shape[:2], []).append(i)
        out: list[list[DetectedFace]] = [[] for _ in images]
        for idx in groups.values():
            results = self._mtcnn(np.stack([copies[i][0] for i in idx]))  # batch (B, h, w, 3)
            for i, (boxes, points) in zip(idx, results):
                out[i] = self._faces(boxes, points, copies[i][1], copies[i][2])
        return out

    def detect_raw(self, image: np.ndarray) -> list[DetectedFace]:
        """All MTCNN detections of a uint8 (H, W, 3) image, largest first, unfiltered.

        Raises ImageTooSmallError when its shorter side is below MTCNN's minimum face size.
        """
        return self.detect_raw_batch([image])[0]

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Detections of a uint8 (H, W, 3) image that pass min_prob and min_size, largest first."""
        return filter_faces(self.detect_raw(image), self.min_prob, self.min_size)


def pad_image(image: np.ndarray, factor: float, mode: str = "constant") -> tuple[np.ndarray, int, int]:
    """Pad a (H, W, 3) image to about `factor` times its size, centred.

    Returns the padded image and the (left, top) offsets of the original inside it.
    mode: "constant" (black border) or "reflect".
    """
    if mode not in ("constant", "reflect"):
        raise ValueError(f"pad mode must be 'constant' or 'reflect', got {mode!r}")
    h, w = image.shape[:2]
    top = int(round(h * (factor - 1) / 2))
    left = int(round(w * (factor - 1) / 2))
    if mode == "reflect":  # numpy's reflect needs pad < size
        top, left = min(top, h - 1), min(left, w - 1)
    padded = np.pad(image, ((top, top), (left, left), (0, 0)), mode=mode)
    return padded, left, top


def detect_with_retry(
    image: np.ndarray,
    detector: FaceDetector,
    pad_retry: float = 1.25,
    pad_mode: str = "constant",
    filtered: bool = True,
    first: list[DetectedFace] | None = None,
) -> list[DetectedFace]:
    """Detect faces; if none, retry once on a padded copy (faces cut by the border) and map back.

    Boxes found on the padded copy are translated back and clipped to the original image.
    pad_retry <= 1 disables the retry. `filtered=False` returns raw detections. `first`: the raw
    detections of `image` when already made (e.g. in a batch), so that only the retry runs here.
    """
    detect = detector.detect if filtered else detector.detect_raw
    if first is None:
        faces = detect(image)
    else:
        faces = filter_faces(first, detector.min_prob, detector.min_size) if filtered else first
    if faces or pad_retry <= 1.0:
        return faces
    padded, left, top = pad_image(image, pad_retry, pad_mode)
    h, w = image.shape[:2]
    return [f.shifted(-left, -top).clipped(h, w) for f in detect(padded)]


def largest_face(
    image: np.ndarray,
    detector: FaceDetector,
    pad_retry: float = 1.25,
    source: str = "<image>",
    pad_mode: str = "constant",
) -> DetectedFace:
    """The largest face passing the detector's filters; raises NoFaceError naming `source` (an
    ImageTooSmallError when the image is smaller than MTCNN's minimum face size)."""
    detector.check_size(image, source)
    faces = detect_with_retry(image, detector, pad_retry, pad_mode)
    if not faces:
        raise NoFaceError(
            f"{source}: no face found (min_prob={detector.min_prob}, min_size={detector.min_size}, "
            f"retried with {pad_retry}x padding)"
        )
    return faces[0]


def crops_for(
    image: np.ndarray, face: DetectedFace, clip_size: int = CLIP_CROP_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops of one face: recognition uint8 (112, 112, 3) and CLIP uint8 (S, S, 3).

    Both are the same similarity alignment of the five landmarks to ARCFACE_TEMPLATE_112 (scaled
    to the crop size), so the CLIP crop covers the same field of view at higher resolution.
    """
    image = _as_uint8_rgb(image)
    recog = align_face(image, face.landmarks, FACE_RECOG_SIZE)  # (112, 112, 3)
    clip = align_face(image, face.landmarks, clip_size)  # (S, S, 3)
    return recog, clip


def same_size_crops(crops: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    """One person's already-aligned crops, uint8 (S, S, 3), stacked as one batch: each must be square (an
    error names the file), and all are resized (bicubic) to the largest side."""
    if not crops:
        raise ValueError("no aligned face crop given for this person")
    for crop, name in zip(crops, names):
        if crop.shape[0] != crop.shape[1]:
            raise ValueError(f"{name}: an aligned face crop is square, this is {crop.shape[1]}x{crop.shape[0]}")
    side = max(c.shape[0] for c in crops)
    return [c if c.shape[0] == side else np.asarray(Image.fromarray(c).resize((side, side), Image.BICUBIC))
            for c in crops]


def box_mask(h: int, w: int, box: np.ndarray | list[float]) -> np.ndarray:
    """uint8 (h, w) mask, 1 on the pixels covered by box ``[x0, y0, x1, y1]`` (clipped), else 0."""
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    c1, r1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
    mask = np.zeros((h, w), dtype=np.uint8)
    if c1 > c0 and r1 > r0:
        mask[r0:r1, c0:c1] = 1
    return mask


def _open_rgb(fp: str | Path | io.BytesIO, source: str) -> np.ndarray:
    try:
        with Image.open(fp) as img:
            img.load()  # force decoding now: truncated files fail here, not later
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise UnreadableImageError(f"{source}: not a readable image ({type(e).__name__}: {e})") from e


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB (EXIF orientation applied).

    Raises UnreadableImageError naming the file for missing, truncated or non-image files.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"{path}: no such file")
    return _open_rgb(path, str(path))


def decode_rgb(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes as uint8 (H, W, 3) RGB; UnreadableImageError names `source`."""
    return _open_rgb(io.BytesIO(data), source)
