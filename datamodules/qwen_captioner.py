"""Caption photos with a local Qwen2-VL / Qwen2.5-VL model into a JSONL caption table.

    uniportrait-caption --input photos/ --model models/Qwen2-VL-7B-Instruct --out captions.jsonl \\
        --device cuda --batch-size 16 --max-pixels 602112
    python -m datamodules.prepare --input photos/ --format folder --out data/shards --captions captions.jsonl

The paper captions its training photos with Qwen-VL; this module is that job. The output is the
caption table `datamodules.captions.load_caption_table` reads (and ``--captions`` of the shard
preparation takes), one object per line::

    {"key": "alice/001.jpg", "caption": "a young woman with long red hair ...", "model": "Qwen2-VL-7B-Instruct"}

``key`` is the image path relative to the input root (the same spelling the ``folder`` source of
`datamodules.prepare` looks up), ``model`` names the captioning model. The table is appended to
and the job resumes: keys already in the table are not captioned again, so an interrupted run is
continued by running it again. Unreadable images are logged with their file name, counted and
skipped (they are tried again on the next run).

The model directory holds a checkpoint and its processor saved with ``save_pretrained`` (a
downloaded ``Qwen/Qwen2-VL-2B-Instruct`` snapshot, for example); it is loaded with
``local_files_only=True``, nothing is downloaded. Decoding is greedy, so captions are
deterministic for a given model, prompt, dtype and device.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datamodules.captions import load_caption_table
from datamodules.prepare.sources import IMAGE_EXTENSIONS
from src.faces import UnreadableImageError, load_rgb

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Write a one-sentence caption for this photo that describes the appearance of each person "
    "(apparent gender and age, hair, clothing, expression, pose) and the scene. "
    "Reply with the sentence only."
)
# config.json model_type -> the transformers class that generates with it
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_model_config(model_dir: str | Path) -> dict:
    """The raw config.json of a saved model; FileNotFoundError / ValueError name the directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a Qwen-VL model saved with save_pretrained")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from e


def model_name(model_dir: str | Path, config: dict | None = None) -> str:
    """The name stored with each caption: config.json's ``_name_or_path`` when it is a hub-style name
    (not a local path), else the directory's name (``.../Qwen2-VL-7B-Instruct`` -> ``Qwen2-VL-7B-Instruct``)."""
    config = read_model_config(model_dir) if config is None else config
    name = config.get("_name_or_path")
    if isinstance(name, str) and name and not Path(name).is_absolute() and not Path(name).exists():
        return name
    return Path(model_dir).resolve().name


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else one of `DTYPES`."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class QwenCaptioner:
    """Batched, greedy image captioning with a Qwen2-VL or Qwen2.5-VL chat model from a local directory.

    Each image becomes one chat turn (the image, then `prompt`); the reply, flattened to one line,
    is the caption.

    Args:
        model_dir: local directory with the model and its processor (``save_pretrained`` layout).
        prompt: the user instruction sent with each image.
        max_new_tokens: generation length limit per caption.
        device: torch device.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16`` (see `resolve_dtype`).
        max_pixels: optional cap on the pixels per image the processor keeps (fewer vision tokens,
            faster); None keeps the processor's setting.
    """

    def __init__(
        self,
        model_dir: str | Path,
        prompt: str = DEFAULT_PROMPT,
        max_new_tokens: int = 77,
        device: str = "cpu",
        dtype: str = "auto",
        max_pixels: int | None = None,
    ) -> None:
        import transformers

        config = read_model_config(model_dir)
        model_type = config.get("model_type")
        if model_type not in MODEL_CLASSES:
            raise ValueError(
                f"{model_dir}/config.json: model_type {model_type!r} is not a Qwen-VL model; "
                f"expected one of {sorted(MODEL_CLASSES)}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.name = model_name(model_dir, config)
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.processor = transformers.AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        self.image_size = None
        if max_pixels is not None:
            size = self.processor.image_processor.size
            self.image_size = {"shortest_edge": min(int(size["shortest_edge"]), max_pixels), "longest_edge": max_pixels}
        model_cls = getattr(transformers, MODEL_CLASSES[model_type])
        self.model = model_cls.from_pretrained(str(model_dir), local_files_only=True, dtype=self.dtype)
        self.model.to(self.device).eval()

    def chat_text(self) -> str:
        """The prompt as the model sees it (chat template applied, the image as placeholder tokens)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray | Image.Image]) -> list[str]:
        """Images (uint8 (H, W, 3) RGB arrays or PIL images) -> one caption each, in order."""
        if not images:
            return []
        pils = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
        kwargs = {"size": self.image_size} if self.image_size else {}
        inputs = self.processor(
            text=[self.chat_text()] * len(pils), images=pils, padding=True, return_tensors="pt", **kwargs
        ).to(self.device)
        ids = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )  # (B, T + new); left padding puts every prompt at [:, :T]
        new = ids[:, inputs["input_ids"].shape[1]:]  # (B, new)
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def list_images(source: str | Path, root: str | Path | None = None) -> list[tuple[str, Path]]:
    """The images to caption as sorted, de-duplicated (key, path) pairs.

    `source` is a folder (searched recursively for .jpg .jpeg .png .webp .bmp) or a list file (one
    image path per line, blank lines and ``#`` comments ignored; relative paths are relative to
    `root`). Keys are posix paths relative to `root`, which defaults to the folder itself or the
    list file's directory; a path outside `root` keeps its absolute spelling as key.
    """
    source = Path(source)
    if source.is_dir():
        base = Path(root) if root is not None else source
        paths = [p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    elif source.is_file():
        base = Path(root) if root is not None else source.parent
        lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines()]
        paths = [base / ln for ln in lines if ln and not ln.startswith("#")]
    else:
        raise FileNotFoundError(f"{source}: no such folder or list file")
    base = Path(os.path.abspath(base))  # absolute, ".." folded, symlinks kept (as the folder source keys them)
    out: dict[str, Path] = {}
    for p in paths:
        p = Path(os.path.abspath(p))
        key = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix()
        out.setdefault(key, p)
    return sorted(out.items())


@dataclass
class CaptionCounts:
    """What one captioning run did."""

    inputs: int = 0  # images listed
    existing: int = 0  # already in the table, skipped
    captioned: int = 0  # new lines written
    unreadable: int = 0  # could not be decoded, skipped
    empty: int = 0  # the model replied with nothing; not written


def _load(path: Path) -> np.ndarray | None:
    try:
        return load_rgb(path)  # (H, W, 3) uint8
    except UnreadableImageError as e:
        log.warning("unreadable image skipped: %s", e)
        return None


def _ends_without_newline(path: Path) -> bool:
    """Whether a non-empty file lacks its final newline (appending would glue two lines together)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _batches(items: list[tuple[str, Path]], size: int) -> Iterable[list[tuple[str, Path]]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def caption_images(
    captioner: QwenCaptioner,
    items: list[tuple[str, Path]],
    table: str | Path,
    batch_size: int = 8,
    progress: bool = True,
) -> CaptionCounts:
    """Caption the (key, path) `items` not yet in `table` and append one JSONL line per caption.

    Each batch is written and flushed as soon as it is captioned, so an interrupted run loses at
    most one batch. A malformed existing table raises `CaptionFileError` naming the file and line.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    table = Path(table)
    done = set(load_caption_table(table)) if table.is_file() else set()
    todo = [(k, p) for k, p in items if k not in done]
    counts = CaptionCounts(inputs=len(items), existing=len(items) - len(todo))
    table.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = _ends_without_newline(table)
    with table.open("a", encoding="utf-8") as f, tqdm(
        total=len(todo), unit="img", desc="caption", dynamic_ncols=True, disable=not progress
    ) as bar:
        if needs_newline:
            f.write("\n")
        for batch in _batches(todo, batch_size):
            loaded = [(key, _load(path)) for key, path in batch]
            readable = [(key, image) for key, image in loaded if image is not None]
            counts.unreadable += len(loaded) - len(readable)
            captions = captioner([image for _, image in readable])
            lines = []
            for (key, _), caption in zip(readable, captions):
                if not caption:
                    counts.empty += 1
                    log.warning("empty caption for %s; not written", key)
                    continue
                lines.append(json.dumps({"key": key, "caption": caption, "model": captioner.name}, ensure_ascii=False))
            if lines:
                f.write("\n".join(lines) + "\n")
                f.flush()
            counts.captioned += len(lines)
            bar.update(len(batch))
    return counts


def summary(counts: CaptionCounts, table: str | Path) -> str:
    """One line for the end of a run."""
    c = asdict(counts)
    return (f"captioned {c['captioned']} of {c['inputs']} images into {table}; "
            f"{c['existing']} already there, {c['unreadable']} unreadable, {c['empty']} empty")
