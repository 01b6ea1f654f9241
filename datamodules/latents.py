"""Cache VAE latents in the shards, so training skips the frozen VAE encoder.

At SD1.5 scale the VAE encoder at 512 px costs more than the UNet's LoRA training step; it is frozen and
deterministic (posterior mode), so each image is encoded once here instead of every epoch:

    python -m datamodules.latent_cache --shards 'data/single/{000000..000499}.tar' \\
        --vae weights/stable-diffusion-v1-5 --resolution 512 --out data/single_latents

or, for SDXL's aspect-ratio buckets (`datamodules.buckets`), ``--buckets sdxl_1024`` (or a list such as
``1024x1024,896x1152``) in place of ``--resolution``. It writes, for every input shard, a shard of the same
name under --out holding each sample unchanged, in the same order, plus ``latent.npz``:

| array            | content                                                                    |
|------------------|----------------------------------------------------------------------------|
| ``latent``       | float16 (C, h/f, w/f): scaled VAE latent (mode * scaling_factor) of the crop |
| ``box``          | int64 (4,): the crop window (x0, y0, width, height) in pixels of ``jpg``    |
| ``frame``        | int64 (2,): (h, w) the window was resized to before encoding: (R, R) or the bucket |
| ``scaling_factor``| float64: the VAE's scaling factor                                          |
| ``original_size``| int64 (2,): (H, W) of ``jpg`` (SDXL's size conditioning, datamodules/collate.py) |
| ``crop_top_left``| int64 (2,): (top, left) of the crop scaled to the frame                    |

The frame is (R, R), or with buckets the bucket nearest the image's aspect ratio (`buckets.training_frame`, as the
loader picks it). The crop is the deterministic evaluation window of that frame over *all* faces
(`transforms.centre_window`), stored so the loader crops image and masks with the same window in both stages
(stage 1 keeps one face, which would otherwise move the window). Training with ``data.cached_latents=true``
therefore uses this fixed crop (``data.random_crop`` must be false) and reads the latent instead of running
the VAE; the loader skips, counts and logs a sample whose latent is of another frame than the one
``data.resolution`` / ``data.buckets`` gives it. Samples that cannot be decoded are copied through without a
latent and counted; the loader then skips them.

Each shard is written under a temporary name and renamed when whole; ``latent_cache.json`` in --out then
records it, with the settings (frames, the VAE's scaling factor and channels, its path). A re-run resumes: it
skips the shards listed there and refuses other frames or another VAE scaling factor, naming them (a killed
run re-encodes only the shard it was in, and writes it byte for byte as an uninterrupted run does). Two input
shards of one file name, or --out holding an input, are refused before anything is written. With
``--distributor ray`` every shard is a Ray task (datamodules/latents_ray.py; one GPU each with --device cuda),
with the same output.

Older caches were square only: ``box`` (x0, y0, side) and ``resolution`` R, read as the window
(x0, y0, side, side) and the frame (R, R) (`datamodules.schema.decode_latent`). Caches written before
2026-12-07 also lack ``original_size`` / ``crop_top_left``. Both follow exactly from the stored box, frame and
the image in the shard, so the loader derives them (`size_conditioning`), logs the first such sample per
worker naming its shard, and counts them in a log line at the end of the pass; re-running the cache adds the
fields. Stored fields that disagree with the box and image (an image replaced after caching) make the sample
a counted skip naming the shard.

The command is `uniportrait-latent-cache` (src/cli/latent_cache.py); this module is its library.
"""
from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from datamodules.buckets import Bucket, training_frame
from datamodules.schema import LATENT_KEY, CachedLatent, Sample, SampleError, decode_sample, encode_latent
from datamodules.transforms import Window, centre_window, crop_window
from src.conventions import uint8_to_unit, vae_latents
from src.paths import changed_settings, is_local, write_json_atomic

log = logging.getLogger(__name__)


def _raw_samples(url: str) -> Iterator[dict]:
    """Raw tar samples of one shard (bytes per extension, plus __key__ / __url__)."""
    yield from wds.tarfile_to_samples()([{"url": url}])


@torch.no_grad()
def _encode(vae: torch.nn.Module, images: list[np.ndarray], device: torch.device) -> np.ndarray:
    x = uint8_to_unit(np.stack(images)).to(device)  # (b, 3, h, w) in [-1, 1]
    return vae_latents(vae, x).float().cpu().numpy()  # (b, C, h/f, w/f)


def cache_shard(url: str, out: Path, vae: torch.nn.Module, resolution: int | None, batch_size: int = 16,
                device: str | torch.device = "cpu", buckets: Sequence[Bucket] | None = None) -> dict[str, int]:
    """Copy one shard to `out`, adding `latent.npz` to every decodable sample; returns counts.

    Each sample is cropped with the deterministic window of its frame (`buckets.training_frame`) and encoded in batches
    of one frame; samples are written in the input order (a sample waits for its frame's batch)."""
    device = torch.device(device)
    scaling = float(vae.config.scaling_factor)
    counts = {"cached": 0, "copied_without_latent": 0}
    slots: list[list] = []  # [raw, latent.npz bytes | None (undecodable) | False (batch waits)], input order
    pending: dict[Bucket, list[tuple[list, Window, Sample]]] = {}  # frame -> (slot, window, cropped sample)
    tmp = out.with_name(out.name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=0.0) as sink:  # fixed member mtime: the same input gives the same bytes
        def encode(frame: Bucket) -> None:
            group = pending.pop(frame, [])
            if not group:
                return
            latents = _encode(vae, [g[2].image for g in group], device)
            for (slot, window, cropped), z in zip(group, latents):
                slot[1] = encode_latent(CachedLatent(z, window, frame, scaling, cropped.extra["original_size"],
                                                     cropped.extra["crop_top_left"]))
            counts["cached"] += len(group)

        def write_ready() -> None:
            done = 0
            while done < len(slots) and slots[done][1] is not False:
                raw, latent = slots[done]
                sink.write(raw if latent is None else {**raw, LATENT_KEY: latent})
                done += 1
            del slots[:done]

        for raw in _raw_samples(url):
            raw = {k: v for k, v in raw.items() if k not in ("__url__", "__local_path__", LATENT_KEY)}
            try:
                sample = decode_sample({**raw, "__url__": url})
            except SampleError as e:
                log.warning("%s (copied without a latent; the loader will skip it)", e)
                slots.append([raw, None])
                counts["copied_without_latent"] += 1
                write_ready()
                continue
            frame = training_frame(*sample.image.shape[:2], resolution, buckets)
            window = centre_window(sample, frame)
            slot = [raw, False]  # False: latent not encoded yet
            slots.append(slot)
            pending.setdefault(frame, []).append((slot, window, crop_window(sample, *window, frame)))
            if len(pending[frame]) >= batch_size:
                encode(frame)
                write_ready()
        for frame in list(pending):
            encode(frame)
        write_ready()
    tmp.replace(out)  # a killed run never leaves a half-written shard under the final name
    return counts


MANIFEST = "latent_cache.json"
CONTENT_SETTINGS = ("frames", "scaling_factor", "latent_channels")  # a change makes other latents: refused
DISTRIBUTORS = ("local", "ray")  # local: this process; ray: a Ray task per shard (datamodules/latents_ray.py)


def cache_settings(vae_config: Mapping[str, Any], vae_path: str | Path, resolution: int | None,
                   buckets: Sequence[Bucket] | None) -> dict[str, Any]:
    """What a cache directory's latents were made with (its manifest's ``settings``)."""
    frames = [list(b) for b in buckets] if buckets else [[resolution, resolution]]
    return {"frames": frames, "scaling_factor": float(vae_config["scaling_factor"]),
            "latent_channels": int(vae_config["latent_channels"]), "vae": str(Path(vae_path).resolve())}


def _load_manifest(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The directory's manifest, checked against `settings`, or a new one."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return {"settings": settings, "shards": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        old = manifest["settings"]
        manifest["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable latent cache manifest ({e}); remove it to start over") from e
    diffs = changed_settings(old, settings, CONTENT_SETTINGS)
    if diffs:
        raise ValueError(f"{path}: settings differ from the run that made this directory ({diffs}); use a new --out")
    if old.get("vae") != settings["vae"]:
        log.warning("%s: made with the VAE at %s, now %s (same scaling factor and channels: kept; use a new --out "
                    "if the weights differ)", path, old.get("vae"), settings["vae"])
    return manifest


def shard_source(url: str) -> dict[str, Any]:
    """What tells one input shard from another of the same file name, wherever it is mounted: a local tar's
    size and first member's name (a remote one's URL)."""
    if not is_local(url) or not Path(url).is_file():
        return {"url": url}
    try:
        with tarfile.open(url) as tar:
            first = tar.next()
    except tarfile.TarError:  # unreadable: caching it reports that; its size still tells it apart
        first = None
    return {"bytes": Path(url).stat().st_size, "first_member": first.name if first else None}


def cache_shards(urls: Sequence[str], out_dir: Path, vae_path: str | Path, resolution: int | None,
                 buckets: Sequence[Bucket] | None = None, batch_size: int = 16, device: str = "cpu",
                 progress: bool = True, distributor: str = "local", ray_address: str | None = None,
                 workers: int = 1) -> dict[str, int]:
    """`cache_shard` for every input shard into `out_dir` (same file names), resumably: ``latent_cache.json``
    records the settings and each finished shard, so a re-run skips the shards already written and refuses
    other settings. `distributor` "ray" runs a Ray task per shard (datamodules/latents_ray.py; at `ray_address`,
    else on a local instance of `workers` CPUs). Returns the totals over the directory (``cached``,
    ``copied_without_latent``) and the shards ``written`` now and ``skipped`` as already cached."""
    if distributor not in DISTRIBUTORS:
        raise ValueError(f"--distributor={distributor!r} is not one of {DISTRIBUTORS}")
    names: dict[str, str] = {}
    for url in urls:
        name = Path(url).name
        if name in names:
            raise ValueError(f"--shards: {names[name]} and {url} share the file name {name!r}; their cached "
                             "copies would overwrite each other in --out (cache them into separate directories)")
        if (out_dir / name).resolve() == Path(url).resolve():
            raise ValueError(f"--out {out_dir} holds the input shard {url}; give another directory")
        names[name] = url
    from diffusers import AutoencoderKL

    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoencoderKL.load_config(vae_dir(vae_path), local_files_only=True)
    manifest = _load_manifest(out_dir, cache_settings(config, vae_path, resolution, buckets))
    done = {n for n in manifest["shards"] if n in names and (out_dir / n).is_file()}
    for n in sorted(done):
        saved, now = manifest["shards"][n].get("source"), shard_source(names[n])
        if saved is not None and saved != now:
            raise ValueError(f"{out_dir / n}: cached from another input of that name ({saved}; {names[n]} is now "
                             f"{now}): use a new --out, or delete that shard and rerun")
    if done:
        log.info("%s: %d of %d shard(s) already cached (listed in %s): skipped", out_dir, len(done), len(urls),
                 MANIFEST)
    todo = [u for u in urls if Path(u).name not in done]

    def record(url: str, counts: dict[str, int]) -> None:
        manifest["shards"][Path(url).name] = {**counts, "source": shard_source(url)}
        write_json_atomic(out_dir / MANIFEST, manifest)  # after the shard's rename: a listed shard is whole

    with tqdm(total=len(todo), desc="caching latents", unit="shard", disable=not progress) as bar:
        if distributor == "ray":
            from datamodules.latents_ray import run_ray  # ray is imported only when asked for

            run_ray((load_vae, cache_shard), todo, out_dir, str(vae_path), resolution, buckets, batch_size, device,
                    record, ray_address, workers, bar)
        else:
            vae = load_vae(vae_path).to(device)
            for url in todo:
                record(url, cache_shard(url, out_dir / Path(url).name, vae, resolution, batch_size, device, buckets))
                bar.update()
    listed = [manifest["shards"][n] for n in names]
    return {"cached": sum(c["cached"] for c in listed),
            "copied_without_latent": sum(c["copied_without_latent"] for c in listed),
            "written": len(todo), "skipped": len(done)}


def size_conditioning(cached: CachedLatent, original_size: tuple[int, int], crop_top_left: tuple[int, int],
                      where: str) -> bool:
    """Check a cached latent's stored ``original_size`` / ``crop_top_left`` against the ones derived from the
    image and the latent's window (`transforms.crop_window`). Returns False when the cache predates the
    fields (the derived values are then the ones to use); raises SampleError naming `where` when they differ."""
    if cached.original_size is None or cached.crop_top_left is None:
        return False
    derived = (tuple(original_size), tuple(crop_top_left))
    if (tuple(cached.original_size), tuple(cached.crop_top_left)) != derived:
        raise SampleError(f"{where}: field '{LATENT_KEY}' has original_size {cached.original_size} and "
                          f"crop_top_left {cached.crop_top_left}, but the image and box give {derived[0]} and "
                          f"{derived[1]}: the image changed after caching; re-run python -m datamodules.latent_cache")
    return True


def vae_dir(path: str | Path) -> Path:
    """The folder holding a diffusers VAE's config.json: the base model's `vae/` subfolder or `path` itself
    (FileNotFoundError naming `path` otherwise)."""
    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--vae: no diffusers VAE at '{path}' (expected config.json there or in vae/)")
    return path


def load_vae(path: str | Path) -> torch.nn.Module:
    """A diffusers AutoencoderKL from a local directory: the base model (with a `vae/` subfolder) or the
    VAE folder itself. Nothing is downloaded."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir(path), local_files_only=True).eval().requires_grad_(False)
