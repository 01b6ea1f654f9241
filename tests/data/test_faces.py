"""src.faces on real photographs: detection, landmark order, alignment, masks, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.conventions import ARCFACE_TEMPLATE_112
from src.faces import (
    DetectedFace,
    FaceDetector,
    NoFaceError,
    UnreadableImageError,
    box_mask,
    crops_for,
    detect_with_retry,
    largest_face,
    load_rgb,
    pad_image,
)
from tests.data import fixtures

EYE_TOL_112 = 4.0  # pixels at 112x112


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    torch.manual_seed(0)
    return FaceDetector(min_prob=0.9, min_size=20)


@pytest.fixture(scope="module", params=["astronaut", "grace_hopper"])
def photo(request) -> np.ndarray:
    return getattr(fixtures, request.param)()


def redetected_eyes(crop: np.ndarray, detector: FaceDetector) -> np.ndarray:
    """Eyes (2, 2) re-detected on an aligned crop, in 112-crop pixels.

    The crop is tight (the face fills it); MTCNN needs context, so it is re-detected on a copy
    padded 1.5x with black, and the coordinates are mapped back.
    """
    padded, left, top = pad_image(crop, 1.5, "constant")
    faces = detector.detect_raw(padded)
    assert faces, "no face re-detected on the aligned crop"
    return faces[0].shifted(-left, -top).landmarks[:2] * (112.0 / crop.shape[0])


def test_one_dominant_confident_face(photo, detector):
    faces = detector.detect(photo)
    assert len(faces) == 1
    f = faces[0]
    assert isinstance(f.prob, float) and f.prob > 0.9
    assert f.box.dtype == np.float32 and f.box.shape == (4,)
    assert f.landmarks.dtype == np.float32 and f.landmarks.shape == (5, 2)
    h, w = photo.shape[:2]
    x0, y0, x1, y1 = f.box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    # every landmark lies inside the box
    assert np.all((f.landmarks[:, 0] > x0) & (f.landmarks[:, 0] < x1))
    assert np.all((f.landmarks[:, 1] > y0) & (f.landmarks[:, 1] < y1))


def test_landmark_order(photo, detector):
    lm = largest_face(photo, detector).landmarks
    l_eye, r_eye, nose, l_mouth, r_mouth = lm
    assert l_eye[0] < r_eye[0], "left eye must be on the image left"
    assert l_mouth[0] < r_mouth[0], "left mouth corner must be on the image left"
    assert max(l_eye[1], r_eye[1]) < nose[1] < min(l_mouth[1], r_mouth[1]), "eyes above nose above mouth"


def test_mirrored_photo_mirrors_landmarks(detector):
    img = fixtures.astronaut()
    w = img.shape[1]
    f = largest_face(img, detector)
    m = largest_face(img[:, ::-1].copy(), detector)
    # the mirror's left eye is the original's right eye, reflected
    assert np.allclose(m.landmarks[0, 0], w - f.landmarks[1, 0], atol=3)
    assert np.allclose(m.landmarks[1, 0], w - f.landmarks[0, 0], atol=3)


def test_faces_sorted_largest_first(detector):
    faces = detector.detect(fixtures.two_people())
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    # Grace Hopper (right half) has the larger face in the side-by-side image
    assert faces[0].box[0] > fixtures.astronaut().shape[1]


def test_filters_are_configurable(detector):
    img = fixtures.two_people()
    sizes = sorted(f.short_side for f in detector.detect_raw(img))
    between = (sizes[0] + sizes[1]) / 2
    assert len(FaceDetector(min_prob=0.9, min_size=between).detect(img)) == 1
    assert len(FaceDetector(min_prob=1.01).detect(img)) == 0  # nothing is that confident


@pytest.mark.parametrize("size", [112, 224])
def test_alignment_puts_eyes_on_template(photo, detector, size):
    face = largest_face(photo, detector)
    recog, clip = crops_for(photo, face, clip_size=224)
    assert recog.shape == (112, 112, 3) and recog.dtype == np.uint8
    assert clip.shape == (224, 224, 3) and clip.dtype == np.uint8
    crop = recog if size == 112 else clip
    if size == 112:  # MTCNN is more precise on a 2x upscaled crop
        crop = np.asarray(Image.fromarray(crop).resize((224, 224), Image.Resampling.BICUBIC))
    eyes = redetected_eyes(crop, detector)
    err = np.linalg.norm(eyes - ARCFACE_TEMPLATE_112[:2], axis=1)
    assert err.max() < EYE_TOL_112, f"eyes {eyes} vs template {ARCFACE_TEMPLATE_112[:2]}"


def test_alignment_follows_landmarks_not_image_centre(detector):
    """The photo shifted inside a larger canvas, with its landmarks shifted alike, aligns identically."""
    img = fixtures.grace_hopper()
    canvas = np.zeros((img.shape[0] + 60, img.shape[1] + 90, 3), np.uint8)
    canvas[40 : 40 + img.shape[0], 70 : 70 + img.shape[1]] = img  # offset (x=70, y=40)
    face = largest_face(img, detector)
    a_recog, a_clip = crops_for(img, face, 224)
    b_recog, b_clip = crops_for(canvas, face.shifted(70, 40), 224)
    assert np.abs(a_recog.astype(int) - b_recog.astype(int)).max() <= 1
    assert np.abs(a_clip.astype(int) - b_clip.astype(int)).max() <= 1
    # and swapping x/y (a classic bug) would not: the crop depends on the landmarks
    c_recog, _ = crops_for(img, DetectedFace(face.box, face.landmarks[:, ::-1].copy(), face.prob), 224)
    assert np.abs(a_recog.astype(int) - c_recog.astype(int)).mean() > 10


def check_celeba_eval(detector: FaceDetector, limit: int | None) -> None:
    """Each celeba_eval photo yields a confident face whose aligned eyes land on the template."""
    paths = fixtures.celeba_eval_paths()[:limit]
    if not paths:
        pytest.skip(f"{fixtures.CELEBA_EVAL} not present")
    errors = []
    for p in paths:
        img = fixtures.downscale(load_rgb(p), 320)
        face = largest_face(img, detector, source=str(p))
        assert face.prob > 0.9, p
        _, clip = crops_for(img, face, 224)
        errors.append(np.linalg.norm(redetected_eyes(clip, detector) - ARCFACE_TEMPLATE_112[:2], axis=1).max())
    errors = np.array(errors)
    # the least-squares similarity cannot put every face's eyes exactly on the template
    # (expression, pose), but the typical face lands within the tolerance and none is far off
    assert np.median(errors) < EYE_TOL_112, errors
    assert errors.max() < 2 * EYE_TOL_112, errors


def test_celeba_eval_first_photos_yield_aligned_faces(detector):
    check_celeba_eval(detector, limit=3)


@pytest.mark.slow
def test_celeba_eval_all_photos_yield_aligned_faces(detector):
    check_celeba_eval(detector, limit=None)


def test_blank_image_raises_no_face_naming_source(detector):
    with pytest.raises(NoFaceError, match="blank_frame.png"):
        largest_face(np.full((160, 160, 3), 127, np.uint8), detector, source="blank_frame.png")


def test_pad_retry_finds_face_cut_by_border(detector):
    """A face touching the border is found on the padded retry and mapped back into the image."""
    img = fixtures.grace_hopper()
    face = largest_face(img, detector)
    x0, y0 = int(face.box[0] + face.width * 0.4), int(face.box[1])
    cut = img[y0:, x0:].copy()  # the left 40% of the face cut off by the image border
    assert detect_with_retry(cut, detector, pad_retry=1.0) == [], "precondition: found without padding"
    retried = detect_with_retry(cut, detector, pad_retry=1.6)
    assert retried, "the padded retry should find the cut face"
    f = retried[0]
    h, w = cut.shape[:2]
    assert 0 <= f.box[0] < f.box[2] <= w and 0 <= f.box[1] < f.box[3] <= h
    # the right eye (fully visible) lands where it was in the original, shifted by the cut
    assert np.allclose(f.landmarks[1], face.landmarks[1] - [x0, y0], atol=6)


def test_pad_image_offsets():
    img = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    for mode in ("constant", "reflect"):
        padded, left, top = pad_image(img, 1.5, mode)
        assert padded[top : top + 10, left : left + 20].tolist() == img.tolist()
    with pytest.raises(ValueError, match="wrap"):
        pad_image(img, 1.5, "wrap")


def test_box_mask():
    m = box_mask(10, 12, [2.2, 3.0, 5.5, 7.9])
    assert m.dtype == np.uint8 and m.shape == (10, 12)
    rows, cols = np.nonzero(m)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (3, 7, 2, 5)
    assert box_mask(10, 12, [-5, -5, 100, 100]).all()  # clipped to the image
    assert not box_mask(10, 12, [20, 20, 30, 30]).any()  # outside: empty


def test_detected_face_geometry():
    f = DetectedFace(np.array([10, 20, 50, 40], np.float32), np.zeros((5, 2), np.float32), 0.99)
    assert (f.width, f.height, f.area, f.short_side) == (40, 20, 800, 20)
    g = f.shifted(5, -5)
    assert g.box.tolist() == [15, 15, 55, 35]
    assert f.clipped(30, 45).box.tolist() == [10, 20, 45, 30]


def test_load_rgb_names_bad_files(tmp_path):
    good = fixtures.save_jpeg(tmp_path / "ok.jpg", fixtures.astronaut(64))
    assert load_rgb(good).shape == (64, 64, 3)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(gray)
    assert load_rgb(gray).shape == (8, 9, 3)
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    with pytest.raises(UnreadableImageError, match="not_an_image.jpg"):
        load_rgb(bad)
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(fixtures.corrupt_bytes())
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        load_rgb(trunc)
    with pytest.raises(UnreadableImageError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")


def test_detect_rejects_wrong_dtype(detector):
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((32, 32, 3), np.float32))
