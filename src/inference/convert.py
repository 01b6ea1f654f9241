"""The released UniPortrait weights <-> this project's modules (both directions, lossless).

Released layout (docs: shared/reference/official-checkpoints.md):

- ``uniportrait-faceid_sd15.bin`` = {"faceid_proj": IDEmbedding state dict (same keys as ours),
  "faceid_adapter": {"{i}.to_k_faceid.weight", "{i}.to_v_faceid.weight" (cross-attention only),
  "{i}.to_{q,k,v,out}_lora.{down,up}.weight" (every processor; the single-ID LoRA)}}
- ``uniportrait-router_sd15.bin`` = {"faceid_adapter": {"{i}.to_q_router.{0,2}.*",
  "{i}.to_k_router.{0,2}.*", "{i}.aggr_router.*" (cross-attention only),
  "{i}.to_{q,k,v,out}_lora.{down,up}.weight" (every processor; the multi-ID LoRA)}}

``i`` is the processor's index in ``unet.attn_processors`` order (diffusers registers up_blocks
before mid_block, so the order is down -> up -> mid). Released LoRA ``down`` (rank x in) / ``up``
(out x rank) are peft ``lora_A`` / ``lora_B`` of ``attn.to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``
(scaling alpha / r must be 1: the released LoRA has no alpha). A ``.safetensors`` file with the
same content flattened as ``faceid_proj.<k>`` / ``faceid_adapter.<k>`` is accepted too.

Also here: building the UNet's adapters for given weights (`prepare_unet`), an ID embedding whose
shape is read off a state dict (`id_embedding_from_state_dict`), and our own checkpoints (Lightning
``.ckpt`` or the ``.safetensors`` export of one) -> weights + architecture (`read_checkpoint`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from src.models import adapters
from src.models.adapters import MULTI, SINGLE
from src.models.faceid_attention import FaceIDAttnProcessor
from src.models.id_embedding import IDEmbedding

T = TypeVar("T")

__all__ = [
    "SINGLE",
    "MULTI",
    "ConversionReport",
    "read_released",
    "released_key_map",
    "prepare_unet",
    "id_embedding_from_state_dict",
    "load_released",
    "export_released",
    "released_lora_rank",
    "OurCheckpoint",
    "read_checkpoint",
    "export_checkpoint_safetensors",
]

# released processor-level LoRA name -> the projection of the Attention module it adapts
_LORA_PROJ = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_LORA_DIR = {"down": "lora_A", "up": "lora_B"}


@dataclass
class ConversionReport:
    """What `load_released` did: counts per file and the adapters it filled."""

    files: dict[str, int] = field(default_factory=dict)  # file -> number of tensors consumed
    lora_rank: int = 0
    has_router: bool = False
    processors: int = 0


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def read_released(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """A released file as {"faceid_proj": {...}, "faceid_adapter": {...}} (sections present only).

    ``.bin``/``.pt``/``.pth``: ``torch.load(weights_only=True)`` (a pickle that would build
    arbitrary objects is refused); ``.safetensors``: keys flattened as ``<section>.<key>``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released UniPortrait weights not found: {path}")
    if path.suffix == ".safetensors":
        flat = _unreadable_is_an_error(path, "safetensors", lambda: load_file(str(path), device="cpu"))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            section, _, sub = key.partition(".")
            if section not in ("faceid_proj", "faceid_adapter") or not sub:
                raise KeyError(f"{path}: unexpected key {key!r} (expected 'faceid_proj.<k>' or 'faceid_adapter.<k>')")
            out.setdefault(section, {})[sub] = value
        return out
    obj = _unreadable_is_an_error(path, "torch.load(weights_only=True)",  # a code-executing pickle is refused
                                  lambda: torch.load(str(path), map_location="cpu", weights_only=True))
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of state dicts ('faceid_proj', 'faceid_adapter'), "
                         f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"faceid_proj", "faceid_adapter"})
    if unknown:
        raise KeyError(f"{path}: unexpected top-level keys {unknown} (expected 'faceid_proj', 'faceid_adapter')")
    return {k: dict(v) for k, v in obj.items()}


def _normalise_router_key(key: str) -> str:
    """Accept the reference loader's renamed form too: `3.to_q_multi_id_lora.down.weight` -> `3.to_q_lora...`."""
    return key.replace("_multi_id_lora.", "_lora.")


# ----------------------------------------------------------------------------------------------
# the key map
# ----------------------------------------------------------------------------------------------
def _lora_entries(attn_path: str, idx: int, adapter: str) -> dict[str, str]:
    out = {}
    for rel, proj in _LORA_PROJ.items():
        for rel_dir, peft_dir in _LORA_DIR.items():
            out[f"{idx}.{rel}.{rel_dir}.weight"] = f"{attn_path}.{proj}.{peft_dir}.{adapter}.weight"
    return out


def released_key_map(unet: nn.Module, part: str) -> dict[str, str]:
    """Released ``faceid_adapter`` key -> ``unet.named_parameters()`` name, for one file.

    part: "faceid" (face-ID projections + single-ID LoRA) or "router" (routers + multi-ID LoRA).
    Every processor gets LoRA entries; face-ID processors also their projections / router.
    """
    if part not in ("faceid", "router"):
        raise ValueError(f"released_key_map: part must be 'faceid' or 'router', got {part!r}")
    adapter = SINGLE if part == "faceid" else MULTI
    mapping: dict[str, str] = {}
    for idx, (name, proc) in enumerate(unet.attn_processors.items()):
        attn_path = name[: -len(adapters.PROCESSOR_SUFFIX)]
        mapping.update(_lora_entries(attn_path, idx, adapter))
        if not isinstance(proc, FaceIDAttnProcessor):
            continue
        if part == "faceid":
            for n, _ in proc.named_parameters():
                if not n.startswith("router."):
                    mapping[f"{idx}.{n}"] = f"{name}.{n}"
        else:
            if proc.router is None:
                raise ValueError(f"released_key_map: processor {idx} ({name}) has no router; "
                                 "call prepare_unet(multi=True)")
            for n, _ in proc.router.named_parameters():
                mapping[f"{idx}.{n}"] = f"{name}.router.{n}"
    return mapping


# ----------------------------------------------------------------------------------------------
# building modules that fit given weights
# ----------------------------------------------------------------------------------------------
def released_lora_rank(adapter_sd: dict[str, torch.Tensor], source: str = "<state dict>") -> int:
    """LoRA rank of a released ``faceid_adapter`` dict (rows of ``0.to_q_lora.down.weight``)."""
    for key in ("0.to_q_lora.down.weight", "0.to_q_multi_id_lora.down.weight"):
        if key in adapter_sd:
            return int(adapter_sd[key].shape[0])
    raise KeyError(f"{source}: no '0.to_q_lora.down.weight' key; cannot read the LoRA rank")


def prepare_unet(unet: nn.Module, id_dim: int, num_tokens: int, lora_rank: int, multi: bool) -> None:
    """Install face-ID processors and the single-ID LoRA (and, with `multi`, routers + multi-ID LoRA).

    Idempotent per part: what is already installed is kept. LoRA scaling is alpha / r = 1.
    """
    if not adapters.faceid_processors(unet):
        adapters.install_faceid_processors(unet, id_dim=id_dim, num_tokens=num_tokens)
    if SINGLE not in adapters.lora_names(unet):
        adapters.add_lora(unet, SINGLE, rank=lora_rank)
    if multi:
        if not adapters.router_parameters(unet):
            adapters.add_routers(unet)
        if MULTI not in adapters.lora_names(unet):
            adapters.add_lora(unet, MULTI, rank=lora_rank)
    adapters.set_active_lora(unet, SINGLE)
    unet.requires_grad_(False)


def id_embedding_from_state_dict(sd: dict[str, torch.Tensor], dim_head: int = 64,
                                 source: str = "<state dict>") -> IDEmbedding:
    """An eval-mode IDEmbedding whose shape is read off a ``faceid_proj`` state dict (not loaded yet).

    Widths, depth, queries and FFN multiplier come from the tensors; the head count is
    inner / dim_head (the released model: 768 / 64 = 12 heads).
    """
    try:
        width = sd["latents"].shape[-1]
        num_queries = sd["latents"].shape[1]
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        embedding = IDEmbedding(
            id_dim=sd["proj_id.0.weight"].shape[1],
            structure_dim=sd["proj_clip.0.weight"].shape[1],
            width=width,
            output_dim=sd["proj_out.weight"].shape[0],
            depth=depth,
            num_queries=num_queries,
            heads=inner // dim_head,
            dim_head=dim_head,
            ff_mult=sd["layers.0.2.1.weight"].shape[0] // width,
        )
    except (KeyError, ValueError) as err:
        raise KeyError(f"{source}: not an ID-embedding (faceid_proj) state dict: missing/invalid {err}") from err
    if inner % dim_head:
        raise ValueError(f"{source}: Q-Former inner width {inner} is not a multiple of dim_head={dim_head}")
    return embedding.eval()


# ----------------------------------------------------------------------------------------------
# load / export
# ----------------------------------------------------------------------------------------------
def _check_lora_scaling(unet: nn.Module, adapter: str) -> None:
    """The released LoRA has no alpha: every layer of `adapter` must have scaling 1."""
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling and module.scaling[adapter] != 1.0:
            raise ValueError(f"{name}: LoRA {adapter!r} has scaling {module.scaling[adapter]} "
                             "(need lora_alpha == rank)")


def _keys_message(path: Path, missing: list[str], unexpected: list[str], limit: int = 8) -> str:
    return (
        f"{path}: released layout does not match this UNet: {len(missing)} missing "
        f"{missing[:limit]}, {len(unexpected)} unexpected {unexpected[:limit]}"
    )


@torch.no_grad()
def _load_adapter_part(unet: nn.Module, adapter_sd: dict[str, torch.Tensor], part: str, path: Path) -> int:
    """Strictly copy one file's ``faceid_adapter`` dict into the UNet; returns tensors consumed."""
    mapping = released_key_map(unet, part)
    if part == "router":
        adapter_sd = {_normalise_router_key(k): v for k, v in adapter_sd.items()}
    missing = sorted(set(mapping) - set(adapter_sd))
    unexpected = sorted(set(adapter_sd) - set(mapping))
    if missing or unexpected:
        raise KeyError(_keys_message(path, missing, unexpected))
    params = dict(unet.named_parameters())
    for rel_key, our_key in mapping.items():
        if our_key not in params:
            raise KeyError(f"{path}: {rel_key} maps to {our_key}, which this UNet does not have (LoRA not added?)")
        dst, src = params[our_key], adapter_sd[rel_key]
        if dst.shape != src.shape:
            raise ValueError(f"{path}: {rel_key} has shape {tuple(src.shape)}, {our_key} expects {tuple(dst.shape)}")
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
    return len(mapping)


@torch.no_grad()
def load_released(
    faceid_path: str | Path, router_path: str | Path | None, unet: nn.Module, id_embedding: IDEmbedding
) -> ConversionReport:
    """Load the released face-ID (and router) files strictly into `unet` and `id_embedding`.

    The UNet must already carry the adapters (`prepare_unet(..., multi=router_path is not None)`).
    Every released key is consumed and every adapter parameter filled, else KeyError naming the
    file and the missing / unexpected keys. Returns a ConversionReport.
    """
    faceid_path = Path(faceid_path)
    released = read_released(faceid_path)
    for section in ("faceid_proj", "faceid_adapter"):
        if section not in released:
            raise KeyError(f"{faceid_path}: missing section {section!r} (is this uniportrait-faceid_sd15.bin?)")
    report = ConversionReport()
    try:
        id_embedding.load_state_dict(released["faceid_proj"], strict=True)
    except RuntimeError as err:
        raise KeyError(f"{faceid_path}: faceid_proj does not match the ID embedding: {err}") from err
    _check_lora_scaling(unet, SINGLE)
    n = _load_adapter_part(unet, released["faceid_adapter"], "faceid", faceid_path)
    report.files[str(faceid_path)] = n + len(released["faceid_proj"])
    report.lora_rank = released_lora_rank(released["faceid_adapter"], str(faceid_path))
    report.processors = len(unet.attn_processors)
    if router_path is not None:
        router_path = Path(router_path)
        router = read_released(router_path)
        if set(router) != {"faceid_adapter"}:
            raise KeyError(f"{router_path}: expected only a 'faceid_adapter' section, got {sorted(router)}")
        _check_lora_scaling(unet, MULTI)
        report.files[str(router_path)] = _load_adapter_part(unet, router["faceid_adapter"], "router", router_path)
        report.has_router = True
    return report


def _export_part(unet: nn.Module, part: str) -> dict[str, torch.Tensor]:
    params = dict(unet.named_parameters())
    return {rel: params[ours].detach().cpu().clone().contiguous() for rel, ours in released_key_map(unet, part).items()}


def export_released(
    unet: nn.Module, id_embedding: IDEmbedding, faceid_path: str | Path, router_path: str | Path | None = None,
    dtype: torch.dtype | None = None, metadata: tuple[dict[str, str], dict[str, str]] | None = None,
) -> None:
    """Write this project's adapters in the released layout (plain tensor dicts, ``torch.save``).

    faceid_path gets {"faceid_proj", "faceid_adapter"} (single-ID LoRA); router_path (when given;
    the UNet must have routers and the multi-ID LoRA) gets {"faceid_adapter"}. A ``.safetensors``
    suffix writes the flattened form instead. `dtype` casts every floating tensor (the released files
    are float16: half the size of float32); None keeps the training dtype. Loading the files back with
    `load_released` is bit-exact (exact up to that cast when one is asked for). `metadata`: the
    (face-ID file, router file) safetensors metadata (SDXL's architecture record, `src.inference.arch`, or
    an SD1.5 file's `dim_head`);
    it needs ``.safetensors`` paths. None writes no metadata: the released SD1.5 files.
    """
    if metadata is not None and any(Path(p).suffix != ".safetensors" for p in (faceid_path, router_path) if p):
        raise ValueError(f"export_released: metadata needs .safetensors paths, got {faceid_path}, {router_path}")
    meta_faceid, meta_router = metadata if metadata is not None else (None, None)
    _check_lora_scaling(unet, SINGLE)
    faceid = {
        "faceid_proj": {k: v.detach().cpu().clone().contiguous() for k, v in id_embedding.state_dict().items()},
        "faceid_adapter": _export_part(unet, "faceid"),
    }
    _write(_cast(faceid, dtype), Path(faceid_path), meta_faceid)
    if router_path is not None:
        _check_lora_scaling(unet, MULTI)
        _write(_cast({"faceid_adapter": _export_part(unet, "router")}, dtype), Path(router_path), meta_router)


Sections = dict[str, dict[str, torch.Tensor]]


def _cast(sections: Sections, dtype: torch.dtype | None) -> Sections:
    """Floating tensors to `dtype` (integer buffers untouched); None: unchanged."""
    if dtype is None:
        return sections
    return {s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()} for s, sd in sections.items()}


def _write(sections: dict[str, dict[str, torch.Tensor]], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({f"{s}.{k}": v for s, sd in sections.items() for k, v in sd.items()}, str(path), metadata=metadata)
    else:
        torch.save(sections, str(path))


# ----------------------------------------------------------------------------------------------
# our own checkpoints
# ----------------------------------------------------------------------------------------------
_META_KEY = "uniportrait"


@dataclass
class OurCheckpoint:
    """Adapter weights of a checkpoint trained here, split by destination.

    embedding: IDEmbedding state dict; unet: adapter params by ``unet.named_parameters()`` name;
    stage: 1 or 2; qformer: the QFormerSpec fields (heads, dim_head, ...) when known; lora_rank;
    arch: the base model's architecture ("sd15" / "sdxl") when the checkpoint records it, else None.
    """

    embedding: dict[str, torch.Tensor]
    unet: dict[str, torch.Tensor]
    stage: int
    qformer: dict[str, Any]
    lora_rank: int
    arch: str | None = None


def _split_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    emb, unet, other = {}, {}, []
    for k, v in state.items():
        if k.startswith("identity.embedding."):
            emb[k[len("identity.embedding."):]] = v
        elif k.startswith("unet."):
            unet[k[len("unet."):]] = v
        else:
            other.append(k)
    if other or not emb:
        released = other and all(k.split(".", 1)[0] in ("faceid_proj", "faceid_adapter") for k in other)
        hint = ": a released-layout file (what uniportrait-export writes): load it with --released-faceid / " \
            "--released-router" if released else ""
        raise KeyError(f"{path}: not a UniPortrait adapter checkpoint (no 'identity.embedding.*' keys or unexpected "
                       f"keys {other[:5]}){hint}")
    return emb, unet


def _rank_of(unet_sd: dict[str, torch.Tensor], path: Path) -> int:
    for k, v in unet_sd.items():
        if ".lora_A." in k:
            return int(v.shape[0])
    raise KeyError(f"{path}: no LoRA weights (keys '*.lora_A.<adapter>.weight')")


def _unreadable_is_an_error(path: Path, how: str, read: Callable[[], T]) -> T:
    """`read()`, with any failure (a truncated or foreign file, a refused pickle) as a ValueError naming `path`."""
    try:
        return read()
    except Exception as err:
        raise ValueError(f"{path}: unreadable with {how} (truncated or not this kind of file?): {err}") from err


def read_checkpoint(path: str | Path) -> OurCheckpoint:
    """A Lightning ``.ckpt`` of `UniPortraitModule` (torch.load weights_only) or its ``.safetensors``
    export (`export_checkpoint_safetensors`) -> OurCheckpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        def read() -> tuple[dict, dict[str, torch.Tensor]]:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            return meta, load_file(str(path), device="cpu")

        meta, state = _unreadable_is_an_error(path, "safetensors", read)
    else:
        ckpt = _unreadable_is_an_error(path, "torch.load(weights_only=True)",
                                       lambda: torch.load(str(path), map_location="cpu", weights_only=True))
        if not isinstance(ckpt, dict) or _META_KEY not in ckpt:
            raise ValueError(f"{path}: not a UniPortrait checkpoint (no 'uniportrait' section)")
        hp = ckpt.get("hyper_parameters", {}) or {}
        meta = {"stage": ckpt[_META_KEY].get("stage", 1), "qformer": dict(hp.get("qformer", {}) or {}),
                "lora_rank": hp.get("lora_rank"), "arch": ckpt[_META_KEY].get("arch")}
        state = ckpt["state_dict"]
    emb, unet = _split_state(state, path)
    if "stage" not in meta:
        raise ValueError(f"{path}: missing '{_META_KEY}' metadata with the training stage")
    rank = int(meta.get("lora_rank") or _rank_of(unet, path))
    return OurCheckpoint(emb, unet, int(meta["stage"]), dict(meta.get("qformer") or {}), rank, meta.get("arch"))


def export_checkpoint_safetensors(ckpt_path: str | Path, out_path: str | Path, arch: str | None = None) -> None:
    """Our Lightning ``.ckpt`` -> a ``.safetensors`` with the same keys and the stage / Q-Former / LoRA rank /
    base-model architecture as metadata (`arch` overrides the checkpoint's own record, when it has one)."""
    ck = read_checkpoint(ckpt_path)
    state = {f"identity.embedding.{k}": v for k, v in ck.embedding.items()}
    state.update({f"unet.{k}": v for k, v in ck.unet.items()})
    meta = {"stage": ck.stage, "qformer": ck.qformer, "lora_rank": ck.lora_rank}
    if arch or ck.arch:
        meta["arch"] = arch or ck.arch
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_path), metadata={_META_KEY: json.dumps(meta)})
