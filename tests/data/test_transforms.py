"""Face-preserving crops: faces stay in frame; masks, boxes, landmarks and pixels stay consistent."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.schema import Face, Sample
from datamodules.synthetic.canonical import FaceCache
from datamodules.synthetic.scene import box_to_mask, render_sample
from datamodules.transforms import (
    centre_square,
    centre_window,
    eval_face_crop,
    random_face_crop,
    random_square,
    random_window,
)

COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


def painted_sample(h: int, w: int, boxes: list[list[float]]) -> Sample:
    """Grey image with each face box painted a pure colour; masks from boxes; landmarks at box-relative spots."""
    img = np.full((h, w, 3), 128, np.uint8)
    faces, masks = [], []
    for box, colour in zip(boxes, COLOURS):
        m = box_to_mask(box, h, w)
        img[m.astype(bool)] = colour
        x0, y0, x1, y1 = box
        lms = [[x0 + (x1 - x0) * fx, y0 + (y1 - y0) * fy] for fx, fy in
               [(0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8)]]
        faces.append(Face(box=list(box), landmarks=lms, identity=f"id{len(faces)}"))
        masks.append(m)
    n = len(faces)
    return Sample(key="k", image=img, caption="c", faces=faces,
                  masks=np.stack(masks) if n else np.zeros((0, h, w), np.uint8),
                  recog=np.zeros((n, 112, 112, 3), np.uint8), clip=np.zeros((n, 112, 112, 3), np.uint8))


def check_consistent(out: Sample, res: int | tuple[int, int]) -> None:
    """Faces inside the frame (R x R or a bucket (h, w)); each mask is its box (pixel-centre rule, +-1 px), so
    it covers the box; mask pixels keep the face colour."""
    fh, fw = (res, res) if isinstance(res, int) else res
    assert out.image.shape == (fh, fw, 3) and out.masks.shape == (len(out.faces), fh, fw)
    for i, (f, m) in enumerate(zip(out.faces, out.masks)):
        x0, y0, x1, y1 = f.box
        assert -1e-6 <= x0 < x1 <= fw + 1e-6 and -1e-6 <= y0 < y1 <= fh + 1e-6, f.box
        ys, xs = np.nonzero(m)
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1, (xs.min(), xs.max(), f.box)
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1, (ys.min(), ys.max(), f.box)
        # interior pixels (away from the resampled edge) are the face's colour
        inner = np.zeros_like(m, bool)
        inner[int(np.ceil(y0)) + 1 : int(y1) - 1, int(np.ceil(x0)) + 1 : int(x1) - 1] = True
        if inner.any():
            assert np.abs(out.image[inner].astype(int) - COLOURS[i]).max() <= 2
        lms = np.asarray(f.landmarks)
        assert ((lms >= [x0, y0]) & (lms <= [x1, y1])).all()


@pytest.mark.parametrize("shape", [(96, 96), (80, 140), (150, 70)])
def test_random_crop_keeps_faces_in_frame(shape: tuple[int, int]) -> None:
    h, w = shape
    sd, dx, dy = min(h, w), (w - min(h, w)) // 3, (h - min(h, w)) // 3  # faces fit in a square, off-centre
    boxes = [[10.3 + dx, 12.6 + dy, 30.2 + dx, 36.9 + dy],
             [sd - 30.5 + dx, sd - 28.2 + dy, sd - 8.1 + dx, sd - 6.4 + dy]]
    s = painted_sample(h, w, boxes)
    rng = np.random.default_rng(0)
    squares = set()
    for _ in range(40):
        out = random_face_crop(s, 64, rng, min_scale=0.3)
        check_consistent(out, 64)
        squares.add(random_square(s, rng, 0.3))
    assert len(squares) > 5  # the crop is actually random


def test_random_crop_zooms_on_single_face() -> None:
    s = painted_sample(128, 128, [[50.0, 40.0, 70.0, 66.0]])
    rng = np.random.default_rng(1)
    sides = [random_square(s, rng, 0.3)[2] for _ in range(50)]
    assert min(sides) < 64 and max(sides) > 100  # scale varies between min_scale and the full short side
    for _ in range(20):
        check_consistent(random_face_crop(s, 32, rng, 0.3), 32)


def test_faces_wider_than_the_short_side_are_padded_not_cut() -> None:
    s = painted_sample(40, 200, [[2.0, 5.0, 30.0, 35.0], [170.0, 4.0, 198.0, 36.0]])
    for out in (random_face_crop(s, 48, np.random.default_rng(0)), eval_face_crop(s, 48)):
        check_consistent(out, 48)
        assert (out.image == 0).all(-1).any()  # zero padding above/below


def test_eval_crop_is_deterministic_and_plain_resize_for_square_images() -> None:
    s = painted_sample(96, 96, [[20.0, 30.0, 50.0, 70.0]])
    a, b = eval_face_crop(s, 48), eval_face_crop(s, 48)
    np.testing.assert_array_equal(a.image, b.image)
    assert centre_square(s) == (0, 0, 96)
    np.testing.assert_allclose(a.faces[0].box, np.asarray(s.faces[0].box) / 2)
    check_consistent(a, 48)
    # a non-square image: the centred square moves just enough to hold the face at the left edge
    t = painted_sample(60, 200, [[5.0, 10.0, 30.0, 40.0]])
    assert centre_square(t) == (5, 0, 60)  # centred would start at 70; moved to the face's left edge
    check_consistent(eval_face_crop(t, 60), 60)


def test_synthetic_multi_face_crop_keeps_masks_disjoint() -> None:
    cache = FaceCache()
    for i in range(5):
        s = render_sample(np.random.default_rng(i), [0, 1, 2], 64, 112, "k", cache)
        out = random_face_crop(s, 48, np.random.default_rng(i), 0.5)
        assert out.masks.sum(0).max() == 1
        for f, m in zip(out.faces, out.masks):
            ys, xs = np.nonzero(m)
            assert abs(xs.min() - f.box[0]) <= 1 and abs(xs.max() + 1 - f.box[2]) <= 1
            assert 0 <= f.box[0] and f.box[2] <= 48 and 0 <= f.box[1] and f.box[3] <= 48
        np.testing.assert_array_equal(out.recog, s.recog)  # aligned crops are untouched


def test_no_faces_still_crops() -> None:
    s = painted_sample(50, 80, [])
    out = random_face_crop(s, 32, np.random.default_rng(0))
    assert out.image.shape == (32, 32, 3) and out.masks.shape == (0, 32, 32)


# ------------------------------------------------------------------------------- SDXL size conditioning
def test_square_crop_records_original_size_and_scaled_crop_top_left() -> None:
    """(x0, y0, side) resized to R: original_size = (H, W), crop_top_left = (round(y0 R / side), round(x0 R / side))."""
    t = painted_sample(60, 200, [[5.0, 10.0, 30.0, 40.0]])  # centre square (5, 0, 60), resized 60 -> 48
    out = eval_face_crop(t, 48)
    assert out.extra["original_size"] == (60, 200)
    assert out.extra["crop_top_left"] == (0, 4)  # (0 * 48/60, 5 * 48/60)
    # faces wider than the short side: the square (2, -78, 196) starts 78 px above the image (zero padding)
    w = painted_sample(40, 200, [[2.0, 5.0, 30.0, 35.0], [170.0, 4.0, 198.0, 36.0]])
    assert centre_square(w) == (2, -78, 196)
    out = eval_face_crop(w, 98)  # scale 98 / 196 = 1/2
    assert out.extra["original_size"] == (40, 200) and out.extra["crop_top_left"] == (-39, 1)
    check_consistent(out, 98)


def test_bucket_crop_keeps_the_bucket_aspect_and_maps_faces() -> None:
    """Eval window of aspect 1:2 in a 100 x 180 image with a face at [50, 20, 80, 60]: the widest fitting
    window is 180 x 90, centred at y0 = 5; resized to the bucket (48, 96) by 96 / 180 in both axes."""
    s = painted_sample(100, 180, [[50.0, 20.0, 80.0, 60.0]])
    assert centre_window(s, (48, 96)) == (0, 5, 180, 90)
    out = eval_face_crop(s, (48, 96))
    assert out.extra["original_size"] == (100, 180)
    assert out.extra["crop_top_left"] == (3, 0)  # round(5 * 48 / 90) = round(2.67)
    k = 96 / 180
    np.testing.assert_allclose(out.faces[0].box, [50 * k, 15 * k, 80 * k, 55 * k])
    check_consistent(out, (48, 96))


def test_bucket_crop_beyond_the_image_pads_and_gives_negative_crop_top_left() -> None:
    """A face 90 px high needs a 1:2 window 180 wide, wider than the 120-px image: the window (-65, 5, 180, 90)
    is centred on the face (x from -65 to 115) and zero-padded on the left; the face is not cut."""
    s = painted_sample(100, 120, [[10.0, 5.0, 40.0, 95.0]])
    assert centre_window(s, (48, 96)) == (-65, 5, 180, 90)
    out = eval_face_crop(s, (48, 96))
    assert out.extra["original_size"] == (100, 120)
    assert out.extra["crop_top_left"] == (3, -35)  # (round(5 * 48/90), round(-65 * 96/180) = round(-34.67))
    np.testing.assert_allclose(out.faces[0].box, [40.0, 0.0, 56.0, 48.0])  # (10 + 65) * 96/180 = 40, ...
    check_consistent(out, (48, 96))
    assert (out.image[:, :34] == 0).all()  # 65 px beyond the image = 34.7 output columns of padding
    assert (out.image[:, 36:] != 0).any(-1).all()  # the image itself (grey or face colour) from there on


@pytest.mark.parametrize("bucket", [(48, 96), (96, 48), (64, 64), (40, 56)])
def test_random_bucket_crops_keep_faces_and_agree_with_crop_top_left(bucket: tuple[int, int]) -> None:
    """Random windows of the bucket's aspect: faces inside, masks cover their boxes, and every output
    coordinate is the source one scaled minus crop_top_left (+-0.5 px of the rounding)."""
    s = painted_sample(160, 200, [[20.0, 30.0, 45.0, 62.0], [60.0, 25.0, 82.0, 55.0]])
    rng = np.random.default_rng(0)
    windows = set()
    for _ in range(25):
        windows.add(random_window(s, rng, bucket, 0.4))
        out = random_face_crop(s, bucket, rng, 0.4)
        check_consistent(out, bucket)
        assert out.extra["original_size"] == (160, 200)
        top, left = out.extra["crop_top_left"]
        for src, dst in zip(s.faces, out.faces):
            kx = (dst.box[2] - dst.box[0]) / (src.box[2] - src.box[0])
            ky = (dst.box[3] - dst.box[1]) / (src.box[3] - src.box[1])
            assert abs(dst.box[0] - (src.box[0] * kx - left)) <= 0.5 + 1e-6
            assert abs(dst.box[1] - (src.box[1] * ky - top)) <= 0.5 + 1e-6
    assert len(windows) > 5
    for _, _, cw, ch in windows:  # the window has the bucket's aspect (up to rounding the height)
        assert abs(ch - cw * bucket[0] / bucket[1]) <= 0.5
