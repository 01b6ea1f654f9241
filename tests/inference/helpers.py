"""Tiny model factories for the inference tests (seeded, CPU, seconds).

- `write_tiny_world(root)`: a ComponentPaths-compatible tiny world on disk (diffusers base model
  directory with untrained tiny UNet/VAE/text encoder + SD1.5's tokenizer and scheduler, a tiny
  open_clip CLIP and a tiny IR-18 as safetensors) - like `src.tiny` without the pretraining.
- `tiny_embedding_state(...)`: a random ID-embedding (`faceid_proj`) state dict.
- `released_layout(unet, ...)`: random adapter tensors in the RELEASED layout, written by hand from
  official-checkpoints.md (processor index i over `unet.attn_processors`, `{i}.to_q_lora.down.weight`
  rank x in, ...), independent of src.inference.convert's key map.
- `run_pipeline(pipe, ids, steps)` / `image_array(images)`: one quick generation, and its images as int16 arrays
  (for exact and tolerance comparisons).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from src.inference.pipeline import Identity, PipelineOutput, UniPortraitPipeline
from src.models import presets
from src.models.face_backbone import IRBackbone
from src.models.id_embedding import IDEmbedding
from src.models.presets import ComponentPaths
from src.tiny import architectures, build_tiny_clip, tiny_components


@pytest.fixture(autouse=False)
def one_thread() -> Iterator[None]:
    """Run a test on one intra-op thread: on the shared 2-core machine, multi-threaded tiny ops
    oversubscribe the cores and run 100x slower. Restores the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_QFORMER = dict(width=64, depth=2, num_queries=16, heads=4, dim_head=16)
DIM_HEAD = TINY_QFORMER["dim_head"]
RANK = 4


def write_tiny_world(root: Path, seed: int = 0) -> ComponentPaths:
    """Write the tiny base model, CLIP and face backbone under `root`; return their ComponentPaths."""
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        presets.write_clip_tokenizer(base / "tokenizer")
        architectures.tiny_text_encoder().save_pretrained(base / "text_encoder")
        presets.sd15_scheduler().save_pretrained(base / "scheduler")
        architectures.tiny_vae().save_pretrained(base / "vae")
        architectures.tiny_unet(sample_size=16).save_pretrained(base / "unet")
        clip = build_tiny_clip(seed)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(root / "clip.safetensors"))
        face = IRBackbone(18, architectures.TINY_FACE_WIDTHS, architectures.TINY_FACE_EMBEDDING).eval()
        save_file({k: v.contiguous() for k, v in face.state_dict().items()}, str(root / "face_backbone.safetensors"))
    return tiny_components(root)


def tiny_embedding(id_dim: int, structure_dim: int, output_dim: int, seed: int = 0) -> IDEmbedding:
    """A random eval-mode IDEmbedding of the tiny Q-Former shape (random norms too, not identity)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q = TINY_QFORMER
        m = IDEmbedding(id_dim=id_dim, structure_dim=structure_dim, width=q["width"], output_dim=output_dim,
                        depth=q["depth"], num_queries=q["num_queries"], heads=q["heads"], dim_head=q["dim_head"])
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name or name.startswith("layers.") and ".2.0." in name:
                    p.add_(0.1 * torch.randn_like(p))  # LayerNorm affine away from (1, 0)
    return m.eval()


def tiny_embedding_for(components: ComponentPaths, output_dim: int = architectures.TINY_CROSS_DIM,
                       seed: int = 0) -> IDEmbedding:
    """An IDEmbedding whose input widths fit the tiny world's face backbone and CLIP tower."""
    widths = architectures.TINY_FACE_WIDTHS
    structure = sum(widths[:3]) + architectures.TINY_CLIP_VISION["width"]
    return tiny_embedding(widths[3], structure, output_dim, seed)


def _attn_of(unet: UNet2DConditionModel, proc_name: str):
    return unet.get_submodule(proc_name[: -len(".processor")])


def _lin(attn, name: str) -> tuple[int, int]:
    """(in, out) of attn.<name> (a Linear, possibly peft-wrapped)."""
    mod = attn.get_submodule(name)
    mod = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    return mod.in_features, mod.out_features


def released_layout(
    unet: UNet2DConditionModel, id_dim: int, rank: int = RANK, num_tokens: int = 16, seed: int = 0, scale: float = 0.05
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random (faceid_adapter of the face-ID file, faceid_adapter of the router file) in the released layout.

    Processor i = position in `unet.attn_processors`. Every processor: to_{q,k,v,out}_lora.down.weight
    (rank x in), .up.weight (out x rank). Cross-attention (attn2) processors also: to_k_faceid.weight,
    to_v_faceid.weight (hidden x id_dim) in the face-ID file and to_q_router.0 (h->2h, bias),
    to_q_router.2 (2h->h), to_k_router.0 (D->2D, bias), to_k_router.2 (2D->h), aggr_router (T->1, bias)
    in the router file.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    faceid: dict[str, torch.Tensor] = {}
    router: dict[str, torch.Tensor] = {}
    for i, name in enumerate(unet.attn_processors):
        attn = _attn_of(unet, name)
        for target, proj in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            fin, fout = _lin(attn, proj)
            for out in (faceid, router):
                out[f"{i}.{target}_lora.down.weight"] = rnd(rank, fin)
                out[f"{i}.{target}_lora.up.weight"] = rnd(fout, rank)
        if name.endswith("attn2.processor"):
            hidden = _lin(attn, "to_k")[1]
            h = _lin(attn, "to_q")[0]
            faceid[f"{i}.to_k_faceid.weight"] = rnd(hidden, id_dim) * 10
            faceid[f"{i}.to_v_faceid.weight"] = rnd(hidden, id_dim) * 10
            router[f"{i}.to_q_router.0.weight"] = rnd(2 * h, h) * 10
            router[f"{i}.to_q_router.0.bias"] = rnd(2 * h)
            router[f"{i}.to_q_router.2.weight"] = rnd(h, 2 * h) * 10
            router[f"{i}.to_k_router.0.weight"] = rnd(2 * id_dim, id_dim) * 10
            router[f"{i}.to_k_router.0.bias"] = rnd(2 * id_dim)
            router[f"{i}.to_k_router.2.weight"] = rnd(h, 2 * id_dim) * 10
            router[f"{i}.aggr_router.weight"] = rnd(1, num_tokens) * 10
            router[f"{i}.aggr_router.bias"] = rnd(1)
    return faceid, router


def write_released(
    dir_: Path, unet: UNet2DConditionModel, embedding: IDEmbedding, rank: int = RANK, seed: int = 0
) -> tuple[Path, Path]:
    """Write uniportrait-faceid_sd15.bin / uniportrait-router_sd15.bin (tiny, random) for `unet`."""
    faceid, router = released_layout(unet, id_dim=embedding.output_dim, rank=rank, seed=seed,
                                     num_tokens=embedding.num_queries)
    proj = {k: v.clone() for k, v in embedding.state_dict().items()}
    dir_.mkdir(parents=True, exist_ok=True)
    fp, rp = dir_ / "uniportrait-faceid_sd15.bin", dir_ / "uniportrait-router_sd15.bin"
    torch.save({"faceid_proj": proj, "faceid_adapter": faceid}, fp)
    torch.save({"faceid_adapter": router}, rp)
    return fp, rp


def random_crops(r: int = 1, seed: int = 0, size: int = 112) -> torch.Tensor:
    """(r, 3, size, size) smooth random 'face crops' in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(r, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


PROMPT = "a photo of a person"


def run_pipeline(pipe: UniPortraitPipeline, ids: list[Identity], steps: int, **kw) -> PipelineOutput:
    """`pipe(PROMPT, ids, ...)` with `steps` denoising steps and no progress bar (other arguments pass through)."""
    kw.setdefault("num_inference_steps", steps)
    kw.setdefault("progress", False)
    return pipe(PROMPT, ids, **kw)


def image_array(images: list[Image.Image]) -> np.ndarray:
    """(N, H, W, 3) int16: differences of two generations do not wrap around."""
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)
