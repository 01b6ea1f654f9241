"""Preparation settings: `PrepareConfig` (everything that determines the output shards), its validation, and
`PrepareError`, the error of bad inputs or output directories."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from src.faces import DEFAULT_DETECT_SIZE


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
    detect_size: int = DEFAULT_DETECT_SIZE
    detect_batch: int = 8
    detect_channels_last: bool = True
    workers: int = 1
    device: str = "cpu"
    distributor: str = "local"
    ray_address: str | None = None

    def content_settings(self) -> dict:
        """The settings that change shard contents: all but out, device, workers, distributor and ray_address
        (the shards are the same for any of those; --detect-batch and --detect-channels-last can change detections
        in their last float bits)."""
        d = asdict(self)
        for runtime in RUNTIME_SETTINGS:
            d.pop(runtime)
        return d


RUNTIME_SETTINGS = ("out", "device", "workers", "distributor", "ray_address")
DISTRIBUTORS = ("local", "ray")  # local: this process or --workers spawned processes; ray: Ray tasks
# settings added after manifests were first written: their value in a manifest that lacks them
LEGACY_SETTINGS = {"detect_size": 0, "detect_batch": 1, "detect_channels_last": False}


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
        (cfg.detect_size == 0 or cfg.detect_size >= 64, "detect_size", cfg.detect_size),
        (cfg.detect_batch >= 1, "detect_batch", cfg.detect_batch),
        (cfg.workers >= 1, "workers", cfg.workers),
        (cfg.distributor in DISTRIBUTORS, "distributor", cfg.distributor),
    ]
    for ok, name, value in checks:
        if not ok:
            raise PrepareError(f"invalid --{name.replace('_', '-')}={value}")
    if cfg.ray_address is not None and cfg.distributor != "ray":
        raise PrepareError(f"--ray-address={cfg.ray_address} needs --distributor ray (not {cfg.distributor})")
