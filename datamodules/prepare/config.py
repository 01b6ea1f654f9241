"""Preparation settings: `PrepareConfig` (everything that determines the output shards), its validation, and
`PrepareError`, the error of bad inputs or output directories."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


class PrepareError(RuntimeError):
    """A problem with the inputs or the output directory; the message names the path at fault."""


@dataclass
class PrepareConfig:
    """Everything that determines the output shards (stored in the manifest, checked on resume)."""

    input: str
    format: str
    out: str
    captions: str | None = None
    captioner: str | None = None
    captioner_prompt: str = "a photography of"
    min_faces: int = 1
    max_faces: int = 1
    min_face_size: float = 32.0
    min_prob: float = 0.9
    clip_size: int = 224
    samples_per_shard: int = 1000
    resolution_max: int = 1024
    pad_retry: float = 1.25
    landmark_fallback: bool = True
    shuffle: bool = False
    seed: int = 0
    device: str = "cpu"

    def content_settings(self) -> dict:
        """The settings that change shard contents (all but out and device)."""
        d = asdict(self)
        d.pop("out")
        d.pop("device")
        return d


def resolve_paths(cfg: PrepareConfig) -> None:
    """Make the input, captions and captioner paths absolute (in place)."""
    # absolute paths, so that a resume from another working directory sees the same settings
    if cfg.format != "wds":  # a wds input may be a pattern, kept as given
        cfg.input = str(Path(cfg.input).expanduser().resolve())
    for name in ("captions", "captioner"):
        if getattr(cfg, name):
            setattr(cfg, name, str(Path(getattr(cfg, name)).expanduser().resolve()))


def validate_config(cfg: PrepareConfig) -> None:
    """Raise PrepareError naming the first bad setting."""
    checks = [
        (cfg.samples_per_shard >= 1, "samples_per_shard", cfg.samples_per_shard),
        (cfg.min_faces >= 1, "min_faces", cfg.min_faces),
        (cfg.max_faces >= cfg.min_faces, "max_faces", cfg.max_faces),
        (cfg.clip_size >= 16, "clip_size", cfg.clip_size),
        (cfg.resolution_max >= 64, "resolution_max", cfg.resolution_max),
        (0.0 <= cfg.min_prob <= 1.0, "min_prob", cfg.min_prob),
    ]
    for ok, name, value in checks:
        if not ok:
            raise PrepareError(f"invalid --{name.replace('_', '-')}={value}")
