"""Cached VAE latents (datamodules.latents): written once, read by the DataModule instead of encoding."""
from __future__ import annotations

import io
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import datamodules.latents as latents
from datamodules.datamodule import FaceShardDataModule
from datamodules.latents import load_vae
from datamodules.schema import LATENT_KEY, decode_sample, encode_latent, encode_sample
from src.cli.latent_cache import main
from src.models.id_embedding import QFormerSpec
from src.module import UniPortraitModule
from src.tiny import tiny_components


def widened_shard(src: Path, dst: Path, width: int = 112, widen=lambda i: True) -> Path:
    """The shard's samples (those i with `widen(i)`) on a wider canvas (zero columns on the right; boxes stay
    valid): the eval crop is then a 64-px window whose place depends on which faces it must contain."""
    with wds.TarWriter(str(dst)) as sink:
        for i, raw in enumerate(wds.tarfile_to_samples()([{"url": str(src)}])):
            s = decode_sample(raw)
            if not widen(i):
                sink.write(encode_sample(s))
                continue
            h, w = s.image.shape[:2]
            image = np.zeros((h, width, 3), np.uint8)
            image[:, :w] = s.image
            masks = np.zeros((len(s.faces), h, width), np.uint8)
            masks[:, :, :w] = s.masks
            sink.write(encode_sample(replace(s, image=image, masks=masks)))
    return dst


@pytest.fixture(scope="module")
def cached(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("latents")
    src = widened_shard(tiny_world / "data" / "heldout" / "multi_seen-000000.tar", tmp / "wide-000000.tar")
    out = tmp / "cached"
    counts = main(["--shards", str(src), "--vae", str(tiny_world / "base"), "--resolution", "64",
                   "--out", str(out), "--batch-size", "8"])
    return {"src": src, "out": out / src.name, "counts": counts}


def loader_batches(pattern: str, multi: bool, **kw) -> list[dict]:
    dm = FaceShardDataModule(pattern, multi_id=multi, resolution=64, batch_size=8, num_workers=0, shuffle_buffer=0,
                             random_crop=False, **kw)
    dm.setup("fit")
    return list(dm.train_dataloader())


@pytest.mark.parametrize("multi", [False, True])
def test_cached_latents_are_the_vae_latents_of_the_images_the_loader_returns(tiny_world, cached, multi):
    """In both stages (stage 1 keeps one face, which would move a face-dependent crop) the loader crops
    image and masks with the latent's box: the cached latent is the VAE's latent of that very image."""
    assert cached["counts"]["cached"] > 0 and cached["counts"]["copied_without_latent"] == 0
    vae = load_vae(tiny_world / "base")
    got = loader_batches(str(cached["out"]), multi, cached_latents=True)
    plain = loader_batches(str(cached["src"]), multi)
    assert [b["key"] for b in got] == [b["key"] for b in plain]
    for b in got:
        assert b["latents"].shape == (len(b["key"]), 4, 16, 16)
        with torch.no_grad():
            z = vae.encode(b["image"]).latent_dist.mode() * vae.config.scaling_factor
        torch.testing.assert_close(b["latents"], z, rtol=2e-3, atol=2e-3)  # float16 storage
        assert torch.all(b["latent_scaling"] == vae.config.scaling_factor)
    same = [torch.equal(a["image"], p["image"]) and torch.equal(a["face_masks"], p["face_masks"])
            for a, p in zip(got, plain)]
    if multi:  # all faces kept: the cached box is the uncached eval crop
        assert all(same)
    else:  # one face kept: the uncached eval crop moves for some images, the cached one does not
        assert not all(same)


def test_training_step_uses_cached_latents_and_matches_encoding(tiny_world, cached):
    torch.manual_seed(0)
    m = UniPortraitModule(components=tiny_components(tiny_world), stage=2, lora_rank=4,
                          qformer=QFormerSpec(depth=1, width=32, heads=2, dim_head=16))
    batch = loader_batches(str(cached["out"]), True, cached_latents=True)[0]
    torch.testing.assert_close(m.batch_latents(batch), m.encode_images(batch["image"]), rtol=2e-3, atol=2e-3)
    uncached = {k: v for k, v in batch.items() if k not in ("latents", "latent_scaling")}
    losses = []
    for b in (batch, uncached):
        torch.manual_seed(1)
        losses.append(m.shared_step(b))
    torch.testing.assert_close(losses[0]["diffusion"], losses[1]["diffusion"], rtol=1e-3, atol=1e-5)
    # the cached path really skips the VAE: poisoning its encoder changes nothing
    m.vae.encoder = None
    torch.manual_seed(1)
    torch.testing.assert_close(m.shared_step(batch)["diffusion"], losses[0]["diffusion"])

    wrong = dict(batch, latent_scaling=batch["latent_scaling"] * 2)
    with pytest.raises(ValueError, match="scaling factor"):
        m.batch_latents(wrong)
    with pytest.raises(ValueError, match=r"cached latents are \(4, 8, 8\)"):
        m.batch_latents(dict(batch, latents=batch["latents"][..., :8, :8]))


def test_samples_without_a_usable_latent_are_skipped_counted_and_logged(cached, tmp_path, caplog):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(cached["out"], mixed / "a-000000.tar")
    shutil.copy(cached["src"], mixed / "b-000000.tar")  # no latent.npz
    n_cached = sum(len(b["key"]) for b in loader_batches(str(cached["out"]), True, cached_latents=True))
    with caplog.at_level(logging.WARNING):
        got = loader_batches(str(mixed), True, cached_latents=True)
    assert sum(len(b["key"]) for b in got) == n_cached
    assert sum(int(b["skipped"].sum()) for b in got) == n_cached  # the same samples, uncached, all skipped
    assert any(f"no cached latent (field '{LATENT_KEY}'" in r.getMessage() for r in caplog.records)
    # a cache made for another resolution is skipped too, with the reason
    dm = FaceShardDataModule(str(cached["out"]), multi_id=True, resolution=48, batch_size=8, num_workers=0,
                             shuffle_buffer=0, random_crop=False, cached_latents=True)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        assert list(dm.train_dataloader()) == []
    assert any("cached latent is of a 64x64 frame, data.resolution / data.buckets give this image 48x48"
               in r.getMessage() for r in caplog.records)


def test_cached_latents_need_the_fixed_crop_and_a_real_vae(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="needs data.random_crop=false"):
        FaceShardDataModule("x.tar", cached_latents=True)
    with pytest.raises(FileNotFoundError, match="no diffusers VAE"):
        load_vae(tmp_path)


def _rewrite_latents(src: Path, dst: Path, change) -> Path:
    """A copy of a cached shard whose latent.npz is `change(CachedLatent)`."""
    with wds.TarWriter(str(dst)) as sink:
        for raw in wds.tarfile_to_samples()([{"url": str(src)}]):
            cached = decode_sample(raw).extra["latent"]
            sink.write({k: v for k, v in raw.items() if not k.startswith("__url")} |
                       {LATENT_KEY: encode_latent(change(cached))})
    return dst


def test_cached_latents_store_size_conditioning_and_older_caches_derive_it(cached, tmp_path, caplog):
    """latent.npz holds original_size = the jpg's (H, W) and crop_top_left = the box (x0, y0, side, side) scaled to
    the 64-px frame; batches carry them. A cache without them (written before the fields existed) gives the
    same values, derived from the box, with a warning naming the shard; a cache whose stored values disagree
    with its image is skipped and counted."""
    stored = {}
    for raw in wds.tarfile_to_samples()([{"url": str(cached["out"])}]):
        s = decode_sample(raw)
        c = s.extra["latent"]
        x0, y0, side, height = c.box
        assert height == side and c.frame == (64, 64)
        assert c.original_size == s.image.shape[:2] == (64, 112)  # the widened canvas
        assert c.crop_top_left == (round(y0 * 64 / side), round(x0 * 64 / side))
        stored[s.key] = (c.original_size, c.crop_top_left)
    assert any(left > 0 for _, (_, left) in stored.values())  # some crops start right of the image's left edge
    got = loader_batches(str(cached["out"]), True, cached_latents=True)
    for b in got:
        for i, key in enumerate(b["key"]):
            assert (tuple(b["original_size"][i].tolist()), tuple(b["crop_top_left"][i].tolist())) == stored[key]

    legacy = _rewrite_latents(cached["out"], tmp_path / "legacy-000000.tar",
                              lambda c: replace(c, original_size=None, crop_top_left=None))
    with caplog.at_level(logging.WARNING):
        old = loader_batches(str(legacy), True, cached_latents=True)
    assert [b["key"] for b in old] == [b["key"] for b in got]
    for a, b in zip(old, got):
        assert torch.equal(a["original_size"], b["original_size"]) and torch.equal(a["crop_top_left"],
                                                                                   b["crop_top_left"])
    assert any("legacy-000000.tar predates the cached original_size/crop_top_left" in r.getMessage()
               for r in caplog.records)

    caplog.clear()
    moved = _rewrite_latents(cached["out"], tmp_path / "moved-000000.tar",
                             lambda c: replace(c, crop_top_left=(c.crop_top_left[0], c.crop_top_left[1] + 1)))
    with caplog.at_level(logging.WARNING):
        assert loader_batches(str(moved), True, cached_latents=True) == []
    assert any("moved-000000.tar" in r.getMessage() and "the image changed after caching" in r.getMessage()
               for r in caplog.records)


# the 64 x 112 canvas (log(112 / 64) = 0.56) is nearest the 48 x 80 bucket (0.51), the 64 x 64 one 64 x 64
BUCKETS = [[64, 64], [48, 80]]


def _raw(url: Path) -> list[dict]:
    return list(wds.tarfile_to_samples()([{"url": str(url)}]))


def test_bucketed_cache_keeps_the_order_and_holds_each_images_latent_at_its_bucket(tiny_world, cached, tmp_path,
                                                                                    caplog):
    """`--buckets`: each image is cached at its nearest bucket, encoded in batches of one bucket, and written in
    the input order; the bucketed loader reads image, masks and latent of the same window in both stages, and
    the module takes them. A square cache read with buckets is skipped naming both frames; an older square
    cache (box (x0, y0, side), resolution) reads as the window and frame it stands for."""
    src = widened_shard(tiny_world / "data" / "heldout" / "multi_seen-000000.tar", tmp_path / "mixed-000000.tar",
                        widen=lambda i: i % 3 == 0)  # W S S W S S ...: batches of 2 complete out of order
    counts = main(["--shards", str(src), "--vae", str(tiny_world / "base"), "--buckets", "64x64,48x80",
                   "--out", str(tmp_path / "cached"), "--batch-size", "2"])
    out = tmp_path / "cached" / src.name
    samples = [decode_sample(raw) for raw in _raw(out)]
    assert counts == {"cached": len(samples), "copied_without_latent": 0, "written": 1, "skipped": 0}
    assert [s.key for s in samples] == [raw["__key__"] for raw in _raw(src)]
    assert [s.extra["latent"].frame for s in samples] == [
        (48, 80) if s.image.shape[1] == 112 else (64, 64) for s in samples]

    vae = load_vae(tiny_world / "base")
    for multi in (False, True):
        got = loader_batches(str(out), multi, cached_latents=True, buckets=BUCKETS)
        plain = loader_batches(str(src), multi, buckets=BUCKETS)
        assert {tuple(b["image"].shape[-2:]) for b in got} == {(64, 64), (48, 80)}
        assert sorted(k for b in got for k in b["key"]) == sorted(s.key for s in samples)
        for b in got:
            h, w = b["image"].shape[-2:]
            assert b["latents"].shape == (len(b["key"]), 4, h // 4, w // 4)
            with torch.no_grad():
                z = vae.encode(b["image"]).latent_dist.mode() * vae.config.scaling_factor
            torch.testing.assert_close(b["latents"], z, rtol=2e-3, atol=2e-3)  # float16 storage
        if multi:  # all faces kept: the cached window is the uncached eval crop of the bucket
            assert [b["key"] for b in got] == [b["key"] for b in plain]
            assert all(torch.equal(a["image"], p["image"]) and torch.equal(a["face_masks"], p["face_masks"])
                       for a, p in zip(got, plain))

    torch.manual_seed(0)
    m = UniPortraitModule(components=tiny_components(tiny_world), stage=2, lora_rank=4,
                          qformer=QFormerSpec(depth=1, width=32, heads=2, dim_head=16))
    wide = next(b for b in got if b["image"].shape[-1] == 80)
    torch.testing.assert_close(m.batch_latents(wide), m.encode_images(wide["image"]), rtol=2e-3, atol=2e-3)

    with caplog.at_level(logging.WARNING):  # the square cache of the widened shard: every image is 48 x 80 here
        assert loader_batches(str(cached["out"]), True, cached_latents=True, buckets=BUCKETS) == []
    assert any("cached latent is of a 64x64 frame, data.resolution / data.buckets give this image 48x80"
               in r.getMessage() for r in caplog.records)

    def square_format(c) -> bytes:  # the latent.npz layout of the square-only caches
        buf = io.BytesIO()
        np.savez(buf, latent=c.latent, box=np.asarray(c.box[:3], np.int64), resolution=np.int64(c.frame[0]),
                 scaling_factor=np.float64(c.scaling_factor), original_size=np.asarray(c.original_size, np.int64),
                 crop_top_left=np.asarray(c.crop_top_left, np.int64))
        return buf.getvalue()

    older = tmp_path / "older-000000.tar"
    with wds.TarWriter(str(older)) as sink:
        for raw in _raw(cached["out"]):
            sink.write({k: v for k, v in raw.items() if not k.startswith("__url")} |
                       {LATENT_KEY: square_format(decode_sample(raw).extra["latent"])})
    new, old = (loader_batches(str(p), True, cached_latents=True) for p in (cached["out"], older))
    assert [b["key"] for b in old] == [b["key"] for b in new]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(old, new) for k in ("image", "face_masks", "latents",
                                                                            "crop_top_left"))


@pytest.fixture(scope="module")
def two_shards(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two held-out shards in one folder, and the folder cached by one uninterrupted local run."""
    tmp = tmp_path_factory.mktemp("two_shards")
    (tmp / "in").mkdir()
    for name in ("multi_seen-000000.tar", "single_seen-000000.tar"):
        shutil.copy(tiny_world / "data" / "heldout" / name, tmp / "in" / name)
    args = ["--shards", str(tmp / "in"), "--vae", str(tiny_world / "base"), "--batch-size", "4"]
    full = main(args + ["--resolution", "64", "--out", str(tmp / "full")])
    return {"in": tmp / "in", "args": args, "full": full, "full_dir": tmp / "full"}


def same_files(a: Path, b: Path) -> bool:
    names = ("multi_seen-000000.tar", "single_seen-000000.tar", latents.MANIFEST)
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_an_interrupted_cache_resumes_to_the_same_bytes_and_refuses_other_settings(tiny_world, two_shards,
                                                                                   tmp_path, monkeypatch):
    """latent_cache.json lists each finished shard: a re-run after a kill mid-shard skips the finished ones and
    writes the rest byte for byte as an uninterrupted run does; other frames, or two inputs of one file name,
    are refused naming them."""
    heldout, args, full = tiny_world / "data" / "heldout", two_shards["args"], two_shards["full"]
    assert full["written"] == 2 and full["skipped"] == 0

    encode, cache_shard, shards, batches = latents._encode, latents.cache_shard, [], []

    def counted_shard(url, *a, **kw):
        shards.append(Path(url).name)
        return cache_shard(url, *a, **kw)

    def killed_after_a_batch_of_the_second_shard(*a, **kw):
        batches.append(shards[-1])
        if batches.count(shards[-1]) == 2 and len(shards) == 2:
            raise KeyboardInterrupt
        return encode(*a, **kw)

    monkeypatch.setattr(latents, "cache_shard", counted_shard)
    monkeypatch.setattr(latents, "_encode", killed_after_a_batch_of_the_second_shard)
    part = ["--resolution", "64", "--out", str(tmp_path / "part")]
    with pytest.raises(KeyboardInterrupt):
        main(args + part)
    assert list(json.loads((tmp_path / "part" / latents.MANIFEST).read_text())["shards"]) == ["multi_seen-000000.tar"]
    assert (tmp_path / "part" / "single_seen-000000.tar.tmp").is_file()  # killed while writing it
    assert not (tmp_path / "part" / "single_seen-000000.tar").exists()
    monkeypatch.setattr(latents, "_encode", encode)
    shards.clear()
    resumed = main(args + part)
    assert shards == ["single_seen-000000.tar"]
    assert resumed == {**full, "written": 1, "skipped": 1}
    assert same_files(tmp_path / "part", two_shards["full_dir"])

    # another input under a cached shard's name (another dataset, re-prepared data) is refused, not skipped
    (tmp_path / "renamed").mkdir()
    shutil.copy(two_shards["in"] / "single_seen-000000.tar", tmp_path / "renamed" / "multi_seen-000000.tar")
    with pytest.raises(SystemExit, match=r"part/multi_seen-000000.tar: cached from another input of that name"):
        main(["--shards", str(tmp_path / "renamed"), *args[2:], "--resolution", "64", "--out", str(tmp_path / "part")])
    moved = tmp_path / "moved"
    shutil.copytree(two_shards["in"], moved)  # the same shards on another mount: still cached
    assert main(["--shards", str(moved), *args[2:], "--resolution", "64", "--out", str(tmp_path / "part")]) == \
        {**full, "written": 0, "skipped": 2}

    with pytest.raises(SystemExit, match=r"frames: \[\[64, 64\]\] -> \[\[48, 80\]\]\); use a new --out"):
        main(args + ["--buckets", "48x80", "--out", str(tmp_path / "part")])
    (tmp_path / "other").mkdir()
    shutil.copy(heldout / "multi_seen-000000.tar", tmp_path / "other" / "multi_seen-000000.tar")
    with pytest.raises(SystemExit, match="share the file name 'multi_seen-000000.tar'"):
        main(["--shards", f"{two_shards['in']}/multi_seen-000000.tar::{tmp_path / 'other'}/multi_seen-000000.tar",
              *args[2:], "--resolution", "64", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="holds the input shard"):
        main(args + ["--resolution", "64", "--out", str(two_shards["in"])])
    with pytest.raises(SystemExit, match="--shards: shard pattern .*nowhere"):
        main(["--shards", str(tmp_path / "nowhere"), *args[2:], "--resolution", "64", "--out", str(tmp_path / "x")])


def test_the_ray_distributor_writes_the_local_runs_bytes(two_shards, tmp_path):
    """--distributor ray (a local instance of 2 CPUs, a task per shard): the same shards and manifest, byte for
    byte, as the local run."""
    got = main(two_shards["args"] + ["--resolution", "64", "--distributor", "ray", "--workers", "2",
                                     "--out", str(tmp_path / "ray")])
    assert got == two_shards["full"]
    assert same_files(tmp_path / "ray", two_shards["full_dir"])
