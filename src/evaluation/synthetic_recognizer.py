"""The synthetic world's face recogniser: a sliding-window face detector and embedding on the tiny world's
own face backbone (real detectors find no cartoon faces). Scores the embedded default of `make eval`
(src/evaluation/benchmark.py) and the training callback callbacks/id_metrics.py with recognizer "tiny".

box_iou, sliding_windows, face_square, nms  the detector's window geometry and suppression
fit_logistic                                the faceness classifier (face vs background windows)
SyntheticFaceRecognizer                     a `FaceRecognizer` (src/recognizers.py) built from those
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.conventions import FACE_RECOG_SIZE, to_recog_pixels, uint8_to_unit
from src.recognizers import check_image, sort_largest_first

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
        from datamodules.synthetic.canonical import FaceCache
        from datamodules.synthetic.scene import render_sample

        cache, pos, neg, rendered = FaceCache(), [], [], []
        for i in range(n):
            rng = np.random.default_rng([seed, 4242, i])
            k = 1 + i % 2 if len(ids) > 1 else 1
            who = [int(v) for v in rng.choice(ids, size=k, replace=False)]
            s = render_sample(rng, who, self.image_size, FACE_RECOG_SIZE, f"calib_{i}", cache)
            emb, win = self.window_embeddings(s.image)
            rendered.append((emb, len(who)))  # its window embeddings and face count
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
        # from the window embeddings computed above (what `embed_faces` would compute again)
        stats["face_count_accuracy_on_calibration_renders"] = float(np.mean(
            [len(self._faces_of(emb, self.windows, self.image_size, self.image_size)[0]) == k
             for emb, k in rendered]))
        return weight, threshold, stats

    def embed_faces(self, image: np.ndarray) -> tuple[Tensor, Tensor]:
        """uint8 (H, W, 3) -> (embeddings (K, D) L2-normalised, boxes (K, 4) in the image's pixels), largest first."""
        h, w = image.shape[:2]
        emb, win = self.window_embeddings(image)
        return self._faces_of(emb, win, h, w)

    def _faces_of(self, emb: Tensor, win: np.ndarray, h: int, w: int) -> tuple[Tensor, Tensor]:
        """The faces among windows `win` (W, 4) with embeddings `emb` (W, D) of an h x w image: see `embed_faces`."""
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
