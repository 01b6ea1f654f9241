"""datamodules.prepare with --workers, downscaled and batched detection (MTCNN on CPU, real photographs)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.prepare.config import PrepareError
from src.cli.prepare import main as prep_main
from src.faces import (
    FaceDetector,
    ImageTooSmallError,
    NoFaceError,
    detection_scale,
    filter_faces,
    largest_face,
)
from tests.data import fixtures


def photo_folder(root: Path) -> dict[str, str]:
    """Face photos above --detect-size 256 (so detection runs on a downscaled copy), bad inputs and a tiny
    image; {relative path: expected outcome}, sorted as the preparation lists them."""
    big = fixtures.astronaut(512)  # (512, 512, 3): detected at 256 px
    fixtures.save_jpeg(root / "a_astronaut.jpg", big)
    fixtures.save_jpeg(root / "b_mirror.jpg", big[:, ::-1].copy())
    fixtures.save_jpeg(root / "c_grace.jpg", fixtures.grace_hopper(400))
    fixtures.save_jpeg(root / "d_group.jpg", fixtures.two_people(300))
    (root / "e_broken.jpg").write_bytes(fixtures.corrupt_bytes())
    fixtures.save_jpeg(root / "f_coffee.jpg", fixtures.faceless("coffee", 300))
    fixtures.save_jpeg(root / "g_tiny.jpg", fixtures.astronaut(16))  # 16 px < MTCNN's 20 px minimum face
    return {"a_astronaut.jpg": "kept", "b_mirror.jpg": "kept", "c_grace.jpg": "kept",
            "d_group.jpg": "too_many_faces", "e_broken.jpg": "unreadable", "f_coffee.jpg": "no_face",
            "g_tiny.jpg": "image_too_small"}


def shard_bytes(out: Path, manifest: dict) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in manifest["completed_shards"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same inputs prepared with --workers 1 and --workers 2 (3 shards of 3, 3 and 1 inputs)."""
    root = tmp_path_factory.mktemp("parallel")
    expected = photo_folder(root / "photos")
    result = {}
    for workers in (1, 2):
        torch.manual_seed(0)
        out = root / f"out{workers}"
        argv = ["--input", str(root / "photos"), "--format", "folder", "--out", str(out), "--samples-per-shard", "3",
                "--detect-size", "256", "--detect-batch", "2", "--workers", str(workers)]
        result[workers] = (out, prep_main(argv), argv)
    return result, expected


def test_two_workers_write_the_same_shards_as_one(runs):
    result, expected = runs
    (out1, m1, _), (out2, m2, _) = result[1], result[2]
    assert m1["completed_shards"] == m2["completed_shards"] == [f"shard-{i:06d}.tar" for i in range(3)]
    bytes1, bytes2 = shard_bytes(out1, m1), shard_bytes(out2, m2)
    assert bytes1 == bytes2  # same keys, order and content, byte for byte
    assert m1["shards"] == m2["shards"]
    assert m2["throughput"]["workers"] == 2 and m2["throughput"]["images"] == len(expected)


def test_drops_are_counted_by_reason(runs):
    result, expected = runs
    for _, manifest, _ in result.values():
        assert manifest["inputs"] == 7 and manifest["kept"] == 3
        counts = {r: n for r, n in manifest["dropped"].items() if n}
        assert counts == {"unreadable": 1, "image_too_small": 1, "no_face": 1, "too_many_faces": 1}


def test_resume_after_kill_with_workers(runs, tmp_path):
    """Simulated kill during shard 1: its manifest entry and final file missing, a half-written .tar.tmp
    left. The re-run skips shards 0 and 2 and redoes shard 1, identical to the uninterrupted run."""
    result, _ = runs
    out2, full, argv = result[2]
    out = tmp_path / "out"
    mtimes = kill_during_shard_1(out2, out)
    argv = [*argv[:argv.index("--out") + 1], str(out), *argv[argv.index("--out") + 2:]]
    assert_resumed(out, prep_main(argv), mtimes, out2, full)


def kill_during_shard_1(done: Path, out: Path) -> dict[str, int]:
    """Copy the finished run `done` to `out` as a kill during shard 1 leaves it: shard 1's manifest entry and
    final file missing, a half-written .tar.tmp left. Returns the mtimes of the completed shards 0 and 2."""
    shutil.copytree(done, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shards"]["shard-000001.tar"]
    manifest["finished"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.tar.tmp").write_bytes(b"half a tar")
    return {n: os.stat(out / n).st_mtime_ns for n in ("shard-000000.tar", "shard-000002.tar")}


def assert_resumed(out: Path, again: dict, mtimes: dict[str, int], reference: Path, full: dict) -> None:
    """The re-run into `out` skipped shards 0 and 2, redid shard 1, and equals the uninterrupted run."""
    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes  # completed shards untouched
    assert again["throughput"]["images"] == 3  # only shard 1's inputs were processed
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *full["completed_shards"]]
    assert shard_bytes(out, again) == shard_bytes(reference, full) and again["shards"] == full["shards"]
    assert again["finished"] is True


def test_legacy_manifest_means_full_resolution(tmp_path):
    """A manifest written before --detect-size, --detect-batch and --detect-channels-last existed resumes only
    with the old behaviour: --detect-size 0 (full resolution), --detect-batch 1, --no-detect-channels-last."""
    fixtures.save_jpeg(tmp_path / "photos/a.jpg", fixtures.astronaut(128))
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "photos"), "--format", "folder", "--out", str(out)]
    old = ["--detect-size", "0", "--detect-batch", "1", "--no-detect-channels-last"]
    prep_main([*argv, *old])
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("detect_size", "detect_batch", "detect_channels_last"):
        del manifest["settings"][name]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert prep_main([*argv, *old])["throughput"]["images"] == 0  # all skipped
    with pytest.raises(PrepareError, match="detect_batch: 1 -> 8, detect_channels_last: False -> True, "
                                           "detect_size: 0 -> 640"):
        prep_main(argv)


# ----------------------------------------------------------------------------------------------
# src.faces: downscaled, batched detection


@pytest.fixture(scope="module")
def big_astronaut() -> np.ndarray:
    """The astronaut at 1280 px, a phone-photo-like size where detection runs at half resolution."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((1280, 1280), Image.Resampling.LANCZOS))


def test_downscaled_detection_maps_back_to_full_resolution(big_astronaut):
    full = FaceDetector(detect_size=0).detect(big_astronaut)
    half = FaceDetector(detect_size=640).detect(big_astronaut)
    assert len(full) == len(half) == 1
    f, h = full[0], half[0]
    # one pixel of the 640 px copy is 2 px here: agree within a few copy pixels (face is ~250 px wide)
    assert f.width > 150
    assert np.abs(f.box - h.box).max() < 8
    assert np.abs(f.landmarks - h.landmarks).max() < 6


def test_batched_detection_equals_one_at_a_time(big_astronaut):
    det = FaceDetector(min_prob=0.0, detect_size=256)
    a = big_astronaut
    images = [a, a[:, ::-1].copy(), fixtures.grace_hopper(300), np.ascontiguousarray(a[100:1100, 200:1000])]
    batched = det.detect_raw_batch(images)  # the two 1280 px squares share one batch
    assert len(batched) == len(images)
    for image, faces in zip(images, batched):
        single = det.detect_raw(image)
        assert len(single) == len(faces) > 0
        for s, b in zip(single, faces):
            # the same detections up to float rounding (batched convolutions sum in another order)
            assert np.allclose(s.box, b.box, atol=1e-2) and np.allclose(s.landmarks, b.landmarks, atol=1e-2)
            assert s.prob == pytest.approx(b.prob, abs=1e-5)
    # the mirrored photo's face is mirrored: boxes in each image's own full-res pixels, within two pixels of the
    # 256 px detection copy (5 full-res pixels each)
    w = a.shape[1]
    assert np.allclose([w - batched[0][0].box[2], w - batched[0][0].box[0]], batched[1][0].box[[0, 2]], atol=10)


def test_channels_last_detection_equals_facenet_detect_face(big_astronaut):
    """channels_last=False is facenet-pytorch's MTCNN exactly as shipped; the default (networks on channels-last
    inputs) finds the same faces up to float rounding, on one-face and two-face photos of several sizes."""
    stock = FaceDetector(min_prob=0.0, detect_size=0, channels_last=False)
    boxes, probs, points = stock.mtcnn.detect(big_astronaut, landmarks=True)
    shipped = stock.detect_raw(big_astronaut)
    assert len(shipped) == len(boxes) > 0
    for face, box, prob, lm in zip(shipped, boxes, probs, points):  # both largest first
        assert np.array_equal(face.box, box.astype(np.float32)) and np.array_equal(face.landmarks, lm)
        assert face.prob == prob

    fast = FaceDetector(min_prob=0.0, detect_size=0)
    images = [big_astronaut, fixtures.two_people(400), fixtures.grace_hopper(300)]
    for image, faces in zip(images, [1, 2, 1]):
        a, b = stock.detect_raw(image), fast.detect_raw(image)
        assert len(filter_faces(a, 0.9)) == len(filter_faces(b, 0.9)) == faces and len(a) == len(b)
        for s, f in zip(a, b):
            assert np.allclose(s.box, f.box, atol=1e-2) and np.allclose(s.landmarks, f.landmarks, atol=1e-2)
            assert s.prob == pytest.approx(f.prob, abs=1e-5)


def test_detection_scale():
    assert detection_scale(500, 500, 640, 20) == 1.0  # small enough already
    assert detection_scale(1280, 960, 640, 20) == 0.5
    assert detection_scale(1000, 2000, 0, 20) == 1.0  # 0: full resolution
    assert detection_scale(40, 2000, 640, 20) == 0.5  # a strip keeps its short side at 20 px
    assert detection_scale(10, 2000, 640, 20) == 1.0  # never upscaled


def test_too_small_image_is_an_error_naming_the_file():
    det = FaceDetector()
    with pytest.raises(ImageTooSmallError, match=r"ref_tiny\.png: image of 40x12 px is too small") as e:
        largest_face(np.zeros((12, 40, 3), np.uint8), det, source="ref_tiny.png")
    assert isinstance(e.value, NoFaceError)  # generate and the web handler report it like a face-less photo
    assert det.detect_raw(np.zeros((20, 20, 3), np.uint8)) == []  # 20 px: searchable, nothing there


def test_bench_prepare_runs_on_four_images(tmp_path, capsys):
    from src.cli.bench_prepare import main

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    rows = main(["--images", "4", "--photo-size", "320", "--workers", "2", "--work-dir", str(tmp_path / "w"),
                 "--doc", str(doc), "--no-record", "--no-distributor"])
    text = capsys.readouterr().out
    assert [r["name"] for r in rows] == ["old", "downscaled", "downscaled+batched", "+channels-last", "workers 2"]
    for r in rows:
        assert r["images"] == 4 and r["images_per_s"] > 0 and r["name"] in text
    assert len({r["kept"] for r in rows}) == 1 and rows[0]["kept"] > 0  # every path keeps the same photos
    assert doc.read_text() == "# Benchmarks\n"  # --no-record leaves the doc alone


def test_source_items_travel_to_workers(tmp_path):
    """Every input format's items survive pickling (how they reach spawned workers) and still read."""
    import pickle

    from datamodules.prepare.config import PrepareConfig
    from datamodules.prepare.sources import enumerate_inputs

    fixtures.make_img2dataset_tar(tmp_path / "wds/00000.tar")
    fixtures.make_celeba(tmp_path / "celeba", n_eval=0)
    fixtures.save_jpeg(tmp_path / "folder/alice/1.jpg", fixtures.astronaut(64))
    for fmt in ("wds", "celeba", "folder"):
        _, items = enumerate_inputs(PrepareConfig(input=str(tmp_path / fmt), format=fmt, out="."))
        item = next(iter(items))
        copy = pickle.loads(pickle.dumps(item))
        assert copy.key == item.key and np.array_equal(copy.read(), item.read())
