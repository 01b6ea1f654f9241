"""Examples of the web demo on the embedded default: aligned face crops of the tiny world's held-out ("unseen")
identities, rendered as the benchmark renders its synthetic references (`src.evaluation.identities`), and prompts
worded like the world's captions."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from src.web.handlers import MAX_PEOPLE

COUNT_WORDS = {1: "a person", 2: "two people", 3: "three people", 4: "four people"}
BACKGROUNDS = ("blue", "green", "orange", "purple")


def world_manifest(base_model: str | Path) -> Path | None:
    """The synthetic world's data manifest beside its base model (`<world>/data/manifest.json`, as the benchmark
    finds it), or None for other weights (real photos have no held-out renders to offer)."""
    path = Path(base_model).parent / "data" / "manifest.json"
    return path if path.is_file() else None


def held_out_crops(manifest: Path, out_dir: Path, count: int = MAX_PEOPLE, size: int = 64) -> list[Path]:
    """Aligned crops (PNG) of the first `count` held-out identities of the world of `manifest`, written once
    under `out_dir` (rendering takes ~1 s each; an existing file is kept)."""
    from datamodules.synthetic.identities import manifest_identities
    from src.evaluation.identities import synthetic_reference

    ids = manifest_identities(json.loads(manifest.read_text()), "unseen")[:count]
    if not ids:
        raise ValueError(f"{manifest} lists no held-out ('unseen') identities for the examples")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in ids:
        path = out_dir / f"held_out_{k}.png"
        if not path.is_file():
            recog, _, _ = synthetic_reference(k, size)  # (112, 112, 3), the recognition crop as `--face-crop`
            Image.fromarray(recog).save(path)
        paths.append(path)
    return paths


def prompt_for(people: int, background: int = 0) -> str:
    """A prompt worded like the synthetic captions ('a close-up portrait of two people, green background')."""
    return f"a close-up portrait of {COUNT_WORDS[people]}, {BACKGROUNDS[background % len(BACKGROUNDS)]} background"


def single_examples(crops: list[Path]) -> tuple[list[list], list[str]]:
    """Single-person rows [references, second person, weight, prompt] and their labels."""
    rows: list[list] = [[[str(crops[0])], None, 0.0, prompt_for(1, 0)]]
    labels = ["one held-out person"]
    if len(crops) > 1:
        rows.append([[str(crops[1])], [str(crops[0])], 0.5, prompt_for(1, 1)])
        labels.append("two held-out people, interpolated half-way")
    return rows, labels


def several_examples(crops: list[Path]) -> tuple[list[list], list[str]]:
    """Several-people rows [one crop per person, prompt] (two people first, then all of them) and their labels."""
    counts = sorted({min(2, len(crops)), len(crops)})
    rows = [[[str(c) for c in crops[:n]], prompt_for(n, i + 1)] for i, n in enumerate(counts)]
    return rows, [f"{COUNT_WORDS[n].replace('a person', 'one person')}, held out" for n in counts]
