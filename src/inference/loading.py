"""Loading a `UniPortraitPipeline` from the weights the commands accept, and writing a checkpoint trained
here back out in the released layout.

- `load_components`: ComponentPaths from a YAML (or the embedded tiny world under `DEFAULT_TINY`);
- `default_checkpoint`: the newest last.ckpt of the embedded default's training under `DEFAULT_RUNS`;
- `load_pipeline`: components + either a checkpoint trained here or the released UniPortrait weights,
  moved to a device (generate and evaluate);
- `export_checkpoint`: a checkpoint trained here -> `uniportrait-faceid_sd15` (+ `uniportrait-router_sd15`)
  files that run wherever the authors' weights run (export); on an SDXL base model
  `uniportrait-faceid_sdxl.safetensors` (+ `uniportrait-router_sdxl.safetensors`), the same layout with
  metadata naming the architecture (src/inference/arch.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.config import resolve_config
from src.inference import arch, convert
from src.inference.pipeline import UniPortraitPipeline
from src.models import adapters
from src.models.presets import ComponentPaths

log = logging.getLogger(__name__)

DEFAULT_TINY = Path("artifacts/tiny")
DEFAULT_RUNS = Path("runs/tiny")
FACEID_NAME, ROUTER_NAME = arch.file_names("sd15")


def load_components(path: Path | None, base_model: str | None, tiny_root: Path = DEFAULT_TINY) -> ComponentPaths:
    """ComponentPaths from a YAML (plain keys, a `components:` section or a full config's model.components,
    read as training reads it: `src.config.resolve_config`, so a stage config's inherited components count);
    without a YAML the embedded tiny world under `tiny_root`. `base_model` overrides components.base_model."""
    if path is None:
        from src.tiny import tiny_components

        comps = tiny_components(tiny_root)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"--components: no such file {path}")
        data: Any = resolve_config(path)
        if isinstance(data.get("model"), dict):
            data = data["model"]
        if isinstance(data.get("init_args"), dict):
            data = data["init_args"]
        data = data.get("components", data)
        if isinstance(data.get("init_args"), dict):
            data = data["init_args"]
        try:
            comps = ComponentPaths(**data)
        except TypeError as err:
            raise ValueError(f"{path}: not a ComponentPaths section ({err})") from err
    if base_model is not None:
        comps.base_model = base_model
    return comps


def default_checkpoint(runs: Path = DEFAULT_RUNS) -> Path:
    """The newest last.ckpt of the embedded default's training (`make demo`)."""
    found = sorted(runs.glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint given and none under {runs}: run `make demo`, or pass --checkpoint / --released-faceid"
        )
    return found[-1]


def check_weights(checkpoint: Path | None, released_faceid: Path | None, released_router: Path | None) -> None:
    """A checkpoint trained here or the released weights, not both; the released router only with its faceid file;
    every file given exists."""
    if released_faceid is not None and checkpoint is not None:
        raise ValueError("give either --checkpoint or --released-faceid, not both")
    if released_router is not None and released_faceid is None:
        raise ValueError("--released-router needs --released-faceid")
    for flag, path in (("--checkpoint", checkpoint), ("--released-faceid", released_faceid),
                       ("--released-router", released_router)):
        if path is not None and not Path(path).is_file():  # before any network is built
            raise FileNotFoundError(f"{flag} {path}: no such file")


@dataclass
class LoadedPipeline:
    """What `load_pipeline` loaded: the pipeline, its components and the checkpoint it read (None for the
    released weights; the `default_checkpoint` when none was given)."""

    pipeline: UniPortraitPipeline
    components: ComponentPaths
    checkpoint: Path | None


def load_pipeline(
    *,
    components: Path | None = None,
    base_model: str | None = None,
    tiny_root: Path = DEFAULT_TINY,
    checkpoint: Path | None = None,
    released_faceid: Path | None = None,
    released_router: Path | None = None,
    dim_head: int | None = None,
    runs: Path = DEFAULT_RUNS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedPipeline:
    """The pipeline of `components` (a YAML for `load_components`; default the tiny world under `tiny_root`)
    with either the released UniPortrait weights or an SDXL export (`released_faceid`, optionally
    `released_router`, Q-Former head width `dim_head`; None: the file's metadata, else 64) or a checkpoint
    trained here (default: the newest one under `runs`), on `device` (cast to `dtype` when given). Weights
    made for the other architecture than the base model's fail here, naming both and the file."""
    comps = load_components(components, base_model, tiny_root)
    check_weights(checkpoint, released_faceid, released_router)
    if released_faceid is not None:
        pipe = UniPortraitPipeline.from_released(comps, released_faceid, released_router, dim_head=dim_head)
        return LoadedPipeline(pipe.to(device, dtype), comps, None)
    if checkpoint is None:
        checkpoint = default_checkpoint(runs)
    pipe = UniPortraitPipeline.from_checkpoint(comps, checkpoint)
    return LoadedPipeline(pipe.to(device, dtype), comps, checkpoint)


def export_checkpoint(checkpoint: Path, components_yaml: Path | None, out: Path, base_model: str | None = None,
                      safetensors: bool = False, dtype: torch.dtype | None = None) -> list[Path]:
    """Write the released-layout files of `checkpoint` under `out`; returns their paths.

    `uniportrait-faceid_<arch>` holds the ID embedding, face-ID projections and single-ID LoRA; a stage-2
    checkpoint adds `uniportrait-router_<arch>` (routers, multi-ID LoRA). SD1.5: plain tensor dicts (`.bin`),
    or the flattened `.safetensors` form, exactly the released layout (the latter records a Q-Former head
    width other than the released 64 as `dim_head` metadata; a `.bin` cannot: a warning gives the
    `--dim-head` to load it with). SDXL: always `.safetensors`, with the
    metadata of `src.inference.arch` (architecture, cross_attention_dim, LoRA rank, tokens, Q-Former head width).
    `dtype` (e.g. torch.float16, as the released files) casts the weights. The base model fixes the
    architecture and the UNet's processor order, hence the keys.
    """
    ck = convert.read_checkpoint(checkpoint)
    pipe = UniPortraitPipeline.from_checkpoint(load_components(components_yaml, base_model), checkpoint)
    unet, embedding = pipe.pipe.unet, pipe.identity.embedding
    sdxl = pipe.arch == "sdxl"
    suffix = ".safetensors" if safetensors or sdxl else ".bin"
    faceid_name, router_name = arch.file_names(pipe.arch)
    faceid = out / f"{faceid_name}{suffix}"
    router = out / f"{router_name}{suffix}" if adapters.router_parameters(unet) else None  # a stage-2 checkpoint
    metadata = None
    dim_head = int(ck.qformer.get("dim_head", 64))
    if sdxl:
        common = dict(cross_attention_dim=int(unet.config.cross_attention_dim), lora_rank=ck.lora_rank,
                      num_tokens=embedding.num_queries, dim_head=dim_head)
        metadata = (arch.sdxl_metadata("faceid", **common), arch.sdxl_metadata("router", **common))
    elif dim_head != 64 and suffix == ".safetensors":  # the released head width needs no record
        metadata = ({"dim_head": str(dim_head)},) * 2
    elif dim_head != 64:  # the heads split one weight matrix: a wrong width loads without error, differently
        log.warning("%s: Q-Former head width %d is not the released 64, which a .bin cannot record: load these "
                    "files with --dim-head %d (or export with --safetensors, which records it)", checkpoint,
                    dim_head, dim_head)
    convert.export_released(unet, embedding, faceid, router, dtype=dtype, metadata=metadata)
    return [faceid] + ([router] if router is not None else [])
