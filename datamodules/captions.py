"""Captions for shard preparation: a JSONL caption table, and an optional local VLM captioner.

JSONL format (one object per line, blank lines ignored; e.g. the output of a Qwen-VL captioning
job)::

    {"key": "alice/001.jpg", "caption": "a woman with red hair smiling"}
    {"image": "000123", "text": "a man in a suit"}

The key field is ``key`` or ``image``; the caption field is ``caption`` or ``text``. When a key
repeats, the later line wins (so an appended re-run of a captioning job updates earlier lines).
`lookup_caption` tries several spellings of a source key (relative path, without extension,
basename, stem), so a table keyed by any of them matches.

`VLMCaptioner` runs a transformers image-to-text model saved with ``save_pretrained`` in a local
directory (e.g. ``BlipForConditionalGeneration`` + ``BlipProcessor``); nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

KEY_FIELDS = ("key", "image")
CAPTION_FIELDS = ("caption", "text")


class CaptionFileError(ValueError):
    """A malformed caption file; the message names the file and line number."""


def _parse_caption_line(line: str, where: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CaptionFileError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise CaptionFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = next((obj[k] for k in KEY_FIELDS if k in obj), None)
    caption = next((obj[k] for k in CAPTION_FIELDS if k in obj), None)
    if not isinstance(key, str) or not key:
        raise CaptionFileError(f"{where}: needs a non-empty string field 'key' or 'image'")
    if not isinstance(caption, str):
        raise CaptionFileError(f"{where}: needs a string field 'caption' or 'text'")
    return key, caption.strip()


def load_caption_table(path: str | Path) -> dict[str, str]:
    """Read a JSONL caption file into {key: caption}. Raises CaptionFileError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise CaptionFileError(f"{path}: caption file not found")
    table: dict[str, str] = {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, caption = _parse_caption_line(line, f"{path}:{lineno}")
            table[key] = caption
    return table


def key_candidates(*keys: str) -> list[str]:
    """Spellings under which a source key may appear in a caption table, most specific first.

    "alice/001.jpg" -> ["alice/001.jpg", "alice/001", "001.jpg", "001"].
    """
    out: list[str] = []
    for key in keys:
        p = PurePosixPath(key)
        for cand in (key, str(p.with_suffix("")) if p.suffix else key, p.name, p.stem):
            if cand and cand not in out:
                out.append(cand)
    return out


def lookup_caption(table: dict[str, str], *keys: str) -> str | None:
    """The first non-empty caption found under any spelling of `keys`, else None."""
    for cand in key_candidates(*keys):
        caption = table.get(cand)
        if caption:
            return caption
    return None


class VLMCaptioner:
    """Caption images with a transformers vision-language model from a local directory.

    The directory holds a model and its processor saved with ``save_pretrained`` (e.g.
    ``BlipForConditionalGeneration`` + ``BlipProcessor``). Loading uses ``local_files_only=True``.
    Models whose processor takes ``(images=..., text=prompt)`` and whose ``generate`` continues
    the prompt (BLIP, BLIP-2, GIT-style) are supported; the prompt prefix is stripped from the
    output. Chat-template models (Qwen-VL) are better run as a separate job writing JSONL.

    Args:
        model_dir: local directory with the saved model and processor.
        prompt: conditional text prefix the caption continues.
        max_new_tokens: generation length limit.
        device: torch device.
    """

    def __init__(
        self,
        model_dir: str,
        prompt: str = "a photography of",
        max_new_tokens: int = 30,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; expected a model saved with save_pretrained")
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> str:
        """uint8 (H, W, 3) RGB image -> caption string (greedy decoding, deterministic)."""
        pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
        inputs = self.processor(images=pil, text=self.prompt, return_tensors="pt").to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)  # (1, T)
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        if self.prompt and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt):].strip()
        return f"{self.prompt} {text}".strip() if self.prompt else text
