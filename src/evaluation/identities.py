"""The benchmark's identities: who is evaluated, with which generator input and which reference.

- real world: the 15 CelebA identities of src/evaluation/prompts.py, one reference photo each
  (`<references>/<id>.jpg`), embedded by the metric's recogniser (`reference_photos`, `real_identities`);
- synthetic world: the tiny world's held-out ("unseen") identities, each referenced by one newly rendered
  aligned crop (`synthetic_reference`, `synthetic_identities`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from src.conventions import FACE_RECOG_SIZE
from src.evaluation import prompts as bp
from src.evaluation.synthetic_recognizer import SyntheticFaceRecognizer
from src.faces import NoFaceError, load_rgb
from src.recognizers import FaceRecognizer

DEFAULT_REFERENCES = Path("../shared/data/celeba_eval")
SYNTHETIC_CLASS_WORD = "person"
SYNTHETIC_REFERENCE_SEED = 9191  # first entropy word of the synthetic reference renders


@dataclass
class BenchIdentity:
    """One evaluated identity: its name, class word, generator input and reference for the metrics.

    embedding: (D,) reference embedding from the metric's recogniser.
    image: uint8 (H, W, 3) reference image for CLIP-I (the photo, or the aligned crop).
    """

    name: str
    class_word: str
    identity: Any  # src.inference.pipeline.Identity
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
    from src.inference.pipeline import Identity

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
    from datamodules.synthetic.canonical import FaceCache
    from datamodules.synthetic.scene import render_sample
    from src.alignment import align_face

    rng = np.random.default_rng([SYNTHETIC_REFERENCE_SEED, k])
    s = render_sample(rng, [k], size, FACE_RECOG_SIZE, f"reference_{k}", FaceCache())
    scored = align_face(s.image, np.asarray(s.faces[0].landmarks), FACE_RECOG_SIZE)  # (112, 112, 3)
    return s.recog[0], s.clip[0], scored


def synthetic_identities(
    manifest: dict, k: int | None, recognizer: SyntheticFaceRecognizer, size: int, save_dir: Path | None = None
) -> list[BenchIdentity]:
    """Held-out synthetic identities (manifest "unseen"), at most 15, `k` of them spread over the list."""
    from datamodules.synthetic.identities import manifest_identities
    from src.inference.pipeline import Identity

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
