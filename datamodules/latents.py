"""Cache VAE latents in the shards, so training skips the frozen VAE encoder.

At SD1.5 scale the VAE encoder at 512 px costs more than the UNet's LoRA training step; it is frozen and
deterministic (posterior mode), so each image is encoded once here instead of every epoch:

    python -m datamodules.latent_cache --shards 'data/single/{000000..000499}.tar' \\
        --vae weights/realistic-vision-v5.1 --resolution 512 --out data/single_latents

writes, for every input shard, a shard of the same name under --out holding each sample unchanged plus
``latent.npz``:

| array            | content                                                                    |
|------------------|----------------------------------------------------------------------------|
| ``latent``       | float16 (C, R/f, R/f): scaled VAE latent (mode * scaling_factor) of the crop |
| ``box``          | int64 (3,): the crop (x0, y0, side) in pixels of ``jpg``                    |
| ``resolution``   | int64: R, the side the crop was resized to before encoding                  |
| ``scaling_factor``| float64: the VAE's scaling factor                                          |
| ``original_size``| int64 (2,): (H, W) of ``jpg`` (SDXL's size conditioning, datamodules/collate.py) |
| ``crop_top_left``| int64 (2,): (top, left) of the crop scaled to the R x R frame              |

The crop is the deterministic evaluation square over *all* faces (`transforms.centre_square`), stored so
the loader crops image and masks with the same box in both stages (stage 1 keeps one face, which would
otherwise move the square). Training with ``data.cached_latents=true`` therefore uses this fixed crop
(``data.random_crop`` must be false) and reads the latent instead of running the VAE. Samples that
cannot be decoded are copied through without a latent and counted; the loader then skips them.

Caches written before 2026-12-07 lack ``original_size`` / ``crop_top_left``. Both follow exactly from the
stored ``box``, ``resolution`` and the image in the shard, so the loader derives them (`size_conditioning`),
logs the first such sample per worker naming its shard, and counts them in a log line at the end of the pass;
re-running the cache adds the fields. Stored fields that disagree with the box and image (an image replaced
after caching) make the sample a counted skip naming the shard.

The command is `uniportrait-latent-cache` (src/cli/latent_cache.py); this module is its library.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from datamodules.schema import LATENT_KEY, CachedLatent, Sample, SampleError, decode_sample, encode_latent
from datamodules.transforms import centre_square, crop_and_resize
from src.conventions import uint8_to_unit, vae_latents

log = logging.getLogger(__name__)


def _raw_samples(url: str) -> Iterator[dict]:
    """Raw tar samples of one shard (bytes per extension, plus __key__ / __url__)."""
    yield from wds.tarfile_to_samples()([{"url": url}])


@torch.no_grad()
def _encode(vae: torch.nn.Module, images: list[np.ndarray], device: torch.device) -> np.ndarray:
    x = uint8_to_unit(np.stack(images)).to(device)  # (b, 3, R, R) in [-1, 1]
    return vae_latents(vae, x).float().cpu().numpy()  # (b, C, R/f, R/f)


def cache_shard(url: str, out: Path, vae: torch.nn.Module, resolution: int, batch_size: int = 16,
                device: str | torch.device = "cpu") -> dict[str, int]:
    """Copy one shard to `out`, adding `latent.npz` to every decodable sample; returns counts."""
    device = torch.device(device)
    counts = {"cached": 0, "copied_without_latent": 0}
    pending: list[tuple[dict, tuple[int, int, int], Sample]] = []  # (raw, box, cropped sample)
    tmp = out.with_name(out.name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        def flush() -> None:
            if not pending:
                return
            latents = _encode(vae, [p[2].image for p in pending], device)
            for (raw, box, cropped), z in zip(pending, latents):
                cached = CachedLatent(z, box, resolution, float(vae.config.scaling_factor),
                                      cropped.extra["original_size"], cropped.extra["crop_top_left"])
                sink.write({**raw, LATENT_KEY: encode_latent(cached)})
            counts["cached"] += len(pending)
            pending.clear()

        for raw in _raw_samples(url):
            raw = {k: v for k, v in raw.items() if k not in ("__url__", "__local_path__", LATENT_KEY)}
            try:
                sample = decode_sample({**raw, "__url__": url})
            except SampleError as e:
                log.warning("%s (copied without a latent; the loader will skip it)", e)
                sink.write(raw)
                counts["copied_without_latent"] += 1
                continue
            box = centre_square(sample)
            pending.append((raw, box, crop_and_resize(sample, *box, resolution)))  # image uint8 (R, R, 3)
            if len(pending) >= batch_size:
                flush()
        flush()
    tmp.replace(out)  # a killed run never leaves a half-written shard under the final name
    return counts


def size_conditioning(cached: CachedLatent, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                      where: str) -> bool:
    """Check a cached latent's stored ``original_size`` / ``crop_top_left`` against the ones derived from the
    image and the latent's box (`transforms.crop_and_resize`). Returns False when the cache predates the
    fields (the derived values are then the ones to use); raises SampleError naming `where` when they differ."""
    if cached.original_size is None or cached.crop_top_left is None:
        return False
    derived = (tuple(original_size), tuple(crop_top_left))
    if (tuple(cached.original_size), tuple(cached.crop_top_left)) != derived:
        raise SampleError(f"{where}: field '{LATENT_KEY}' has original_size {cached.original_size} and "
                          f"crop_top_left {cached.crop_top_left}, but the image and box give {derived[0]} and "
                          f"{derived[1]}: the image changed after caching; re-run python -m datamodules.latent_cache")
    return True


def load_vae(path: str | Path) -> torch.nn.Module:
    """A diffusers AutoencoderKL from a local directory: the base model (with a `vae/` subfolder) or the
    VAE folder itself. Nothing is downloaded."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--vae: no diffusers VAE at '{path}' (expected config.json there or in vae/)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)

