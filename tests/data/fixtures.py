"""Input-format fixtures for the data tests, built in temporary directories from real photographs.

Photos: scikit-image's astronaut (Eileen Collins), matplotlib's grace_hopper.jpg, and, when
present, the CelebA evaluation photos in ``<repo>/../shared/data/celeba_eval`` (read from there,
never copied into the repository). Face-less images: scikit-image's coffee and rocket.
All photos are downscaled to at most `MAX_SIDE` pixels to keep MTCNN on CPU fast.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CELEBA_EVAL = REPO.parent / "shared" / "data" / "celeba_eval"
MAX_SIDE = 256


def downscale(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """uint8 (H, W, 3) -> the same image with max(H, W) <= max_side (Lanczos)."""
    h, w = image.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s == 1.0:
        return image
    return np.asarray(Image.fromarray(image).resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS))


def astronaut(max_side: int = MAX_SIDE) -> np.ndarray:
    from skimage import data

    return downscale(data.astronaut(), max_side)


def grace_hopper(max_side: int = MAX_SIDE) -> np.ndarray:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        return downscale(np.asarray(img.convert("RGB")), max_side)


def faceless(which: str = "coffee", max_side: int = MAX_SIDE) -> np.ndarray:
    """A real photo with no face in it (scikit-image's coffee cup or rocket)."""
    from skimage import data

    return downscale(getattr(data, which)(), max_side)


def two_people(max_side: int = MAX_SIDE) -> np.ndarray:
    """Astronaut and Grace Hopper side by side, (max_side, 2 * max_side, 3): two faces."""
    a, g = astronaut(max_side), grace_hopper(max_side)
    h = max(a.shape[0], g.shape[0])
    canvas = np.zeros((h, a.shape[1] + g.shape[1], 3), dtype=np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: g.shape[0], a.shape[1]:] = g
    return canvas


def celeba_eval_paths() -> list[Path]:
    """The CelebA evaluation photos, or [] when the shared data is absent."""
    return sorted(CELEBA_EVAL.glob("*.jpg")) if CELEBA_EVAL.is_dir() else []


def jpeg_bytes(image: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def corrupt_bytes() -> bytes:
    """A truncated JPEG: a valid header, then nothing."""
    return jpeg_bytes(astronaut(64))[:200]


def save_jpeg(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(image))
    return path


def make_folder(root: Path) -> dict[str, str]:
    """A folder with one sub-folder per identity, a root-level image, and bad inputs.

    Returns {relative path: expected outcome} where outcome is "kept" or a drop reason for the
    default filters (1 face, prob >= 0.9, side >= 32 px).
    """
    expected = {
        "astronaut/a1.jpg": "kept",
        "astronaut/a2_mirror.jpg": "kept",
        "grace/g1.jpg": "kept",
        "group.jpg": "too_many_faces",
        "coffee.jpg": "no_face",
        "grace/broken.jpg": "unreadable",
        "notes/not_an_image.png": "unreadable",
    }
    save_jpeg(root / "astronaut/a1.jpg", astronaut())
    save_jpeg(root / "astronaut/a2_mirror.jpg", astronaut()[:, ::-1].copy())
    save_jpeg(root / "grace/g1.jpg", grace_hopper())
    (root / "grace/g1.txt").write_text("Grace Hopper in uniform", encoding="utf-8")  # sidecar source text
    save_jpeg(root / "group.jpg", two_people())
    save_jpeg(root / "coffee.jpg", faceless("coffee"))
    (root / "grace/broken.jpg").write_bytes(corrupt_bytes())
    (root / "notes").mkdir(parents=True, exist_ok=True)
    (root / "notes/not_an_image.png").write_text("hello", encoding="utf-8")
    return expected


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_img2dataset_tar(path: Path, start: int = 0) -> dict[str, dict]:
    """An img2dataset-like shard: per sample ``<key>.jpg``, ``.txt`` (alt text), ``.json``.

    Returns {key: {"text": alt text, "outcome": "kept" | reason}}.
    """
    samples = [
        (astronaut(), "NASA astronaut portrait", "kept"),
        (grace_hopper(), "Commodore Grace Hopper", "kept"),
        (faceless("rocket"), "a rocket on the launch pad", "no_face"),
        (None, "a broken download", "unreadable"),
    ]
    expected: dict[str, dict] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i, (image, text, outcome) in enumerate(samples):
            key = f"{start + i:09d}"
            data = corrupt_bytes() if image is None else jpeg_bytes(image)
            meta = {"url": f"https://example.invalid/{key}.jpg", "caption": text, "key": key, "status": "success"}
            _add_member(tf, f"{key}.jpg", data)
            _add_member(tf, f"{key}.txt", text.encode("utf-8"))
            _add_member(tf, f"{key}.json", json.dumps(meta).encode("utf-8"))
            expected[key] = {"text": text, "outcome": outcome}
    return expected


def make_celeba(root: Path, n_eval: int = 3) -> dict[str, dict]:
    """A CelebA-like layout: img_align_celeba/, identity_CelebA.txt, landmarks and bbox files.

    Uses up to `n_eval` celeba_eval photos when present, plus astronaut and grace_hopper, a
    face-less image that has annotated landmarks (kept through the landmark fallback) and one
    without (dropped as no_face). Returns {file name: {"identity", "outcome", ["landmarks"]}}.
    """
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    expected: dict[str, dict] = {}
    photos = [(p.name, downscale(np.asarray(Image.open(p).convert("RGB")))) for p in celeba_eval_paths()[:n_eval]]
    photos += [("100001.jpg", astronaut()), ("100002.jpg", grace_hopper())]
    for i, (name, image) in enumerate(photos):
        save_jpeg(img_dir / name, image)
        expected[name] = {"identity": str(10 + i), "outcome": "kept"}
    coffee = faceless("coffee")
    save_jpeg(img_dir / "200001.jpg", coffee)
    h, w = coffee.shape[:2]
    # Five plausible landmark positions in the middle of the image (x, y): eyes, nose, mouth.
    lm = np.array([[0.4 * w, 0.4 * h], [0.6 * w, 0.4 * h], [0.5 * w, 0.5 * h],
                   [0.42 * w, 0.6 * h], [0.58 * w, 0.6 * h]])
    lm = np.round(lm).astype(int)
    expected["200001.jpg"] = {"identity": "99", "outcome": "kept", "landmarks": lm.tolist()}
    save_jpeg(img_dir / "200002.jpg", faceless("rocket"))
    expected["200002.jpg"] = {"identity": "98", "outcome": "no_face"}

    ids = "".join(f"{name} {e['identity']}\n" for name, e in expected.items())
    (root / "identity_CelebA.txt").write_text(ids, encoding="utf-8")
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    lm_line = "200001.jpg " + " ".join(str(v) for v in lm.reshape(-1))
    (root / "list_landmarks_align_celeba.txt").write_text(f"1\n{header}\n{lm_line}\n", encoding="utf-8")
    (root / "list_bbox_celeba.txt").write_text("1\nimage_id x_1 y_1 width height\n200001.jpg 95 71 226 313\n")
    return expected
