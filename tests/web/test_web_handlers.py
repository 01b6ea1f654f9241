"""The web demo's request handling, called directly (no server): every bad input is a message, and a good
request gives images and routing overlays in the people's colours."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.inference.io import PALETTE
from src.inference.loading import load_pipeline
from src.inference.pipeline import PipelineOutput, RoutingMap
from src.web.handlers import CROPS, MAX_PEOPLE, PHOTOS, Demo, Settings, overlay, routing_overlays, short_layer_name
from tests.inference.helpers import one_thread, random_crops  # noqa: F401 (fixture)
from tests.web.helpers import blank_photo, released_weights

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Demo:
    opts = released_weights(tiny_world, tmp_path_factory.mktemp("released"))
    loaded = load_pipeline(tiny_root=tiny_world, released_faceid=Path(opts[1]), released_router=Path(opts[3]),
                           dim_head=int(opts[5]))
    return Demo(loaded, CROPS)


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("crops")
    out = []
    for i in range(MAX_PEOPLE + 1):
        crop = ((random_crops(1, seed=10 + i)[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
        out.append(root / f"crop{i}.png")
        Image.fromarray(crop.to(torch.uint8).numpy()).save(out[-1])
    return out


def fast(prompt: str = "a photo of two people") -> Settings:
    return Settings(prompt, steps=2)


def test_an_empty_prompt_is_a_message(demo: Demo, crops: list[Path]) -> None:
    for prompt in ("", "   "):
        result = demo.several([str(p) for p in crops[:2]], CROPS, fast(prompt))
        assert not result.ok and not result.images and "prompt is empty" in result.message


def test_too_many_people_is_a_message(demo: Demo, crops: list[Path]) -> None:
    result = demo.several([str(p) for p in crops], CROPS, fast())
    assert not result.ok and not result.images
    assert f"{MAX_PEOPLE + 1} people uploaded: at most {MAX_PEOPLE}" in result.message


def test_a_photo_without_a_face_is_a_message_naming_it(demo: Demo, tmp_path: Path) -> None:
    photo = blank_photo(tmp_path / "empty_wall.png")
    result = demo.single([str(photo)], None, 0.0, PHOTOS, fast("a photo of a person"))
    assert not result.ok and "empty_wall.png: no face found" in result.message
    items, message = demo.preview([str(photo)], PHOTOS)
    assert items == [] and "empty_wall.png: no face found" in message


def test_an_unreadable_file_is_a_message_naming_it(demo: Demo, crops: list[Path], tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    for kind, files in ((PHOTOS, [notes]), (CROPS, [crops[0], notes])):  # read before any face is looked for
        result = demo.several([str(f) for f in files], kind, fast())
        assert not result.ok and "notes.png: not a readable image" in result.message
    items, message = demo.preview([str(crops[0]), str(notes)], CROPS)
    assert len(items) == 1 and "notes.png: not a readable image" in message  # the good upload is still shown


def test_a_non_square_crop_is_a_message(demo: Demo, tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(wide)
    result = demo.single([str(wide)], None, 0.0, CROPS, fast())
    assert not result.ok and "wide.png: an aligned face crop is square, this is 60x40" in result.message


def test_two_people_give_images_and_an_overlay_per_layer(demo: Demo, crops: list[Path]) -> None:
    result = demo.several([str(p) for p in crops[:2]], CROPS, Settings("two people", steps=2, num_images=2))
    assert result.ok, result.message
    assert len(result.images) == 2 and all(img.size == (64, 64) for img, _ in result.images)
    n_layers = 7  # the tiny UNet's cross-attention layers
    assert len(result.routing) == 2 * (1 + n_layers)
    assert [c for _, c in result.routing[:2]] == ["image 1: all layers", "image 1: down 0.0"]
    assert [name for name, _ in result.legend] == ["person 1", "person 2"]
    assert [c for _, c in result.legend] == ["#e6194b", "#3cb44b"]  # PALETTE[0], PALETTE[1]


def test_one_person_with_an_interpolation_partner_has_no_routing(demo: Demo, crops: list[Path]) -> None:
    alone = demo.single([str(crops[0])], None, 0.0, CROPS, fast("a person"))
    mixed = demo.single([str(crops[0])], [str(crops[1])], 0.5, CROPS, fast("a person"))
    assert alone.ok and mixed.ok and alone.routing == [] and alone.legend == []
    assert not np.array_equal(np.asarray(alone.images[0][0]), np.asarray(mixed.images[0][0]))


def test_overlay_tints_each_position_with_its_identity_colour() -> None:
    image = Image.fromarray(np.full((4, 4, 3), 100, np.uint8))
    hard = torch.zeros(2, 2, 2)  # (N, h, w): identity 0 on the left column, 1 top right, none bottom right
    hard[0, :, 0] = 1
    hard[1, 0, 1] = 1
    out = np.asarray(overlay(image, hard, alpha=0.5)).astype(int)
    left = np.round(0.5 * 100 + 0.5 * PALETTE[0].astype(float))
    top_right = np.round(0.5 * 100 + 0.5 * PALETTE[1].astype(float))
    assert (out[:, :2] == left).all() and (out[:2, 2:] == top_right).all() and (out[2:, 2:] == 100).all()


def test_the_all_layers_overlay_takes_the_majority() -> None:
    image = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    one, two = torch.tensor([[[1.0]], [[0.0]]]), torch.tensor([[[0.0]], [[1.0]]])  # (N=2, 1, 1)
    maps = [RoutingMap(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2", m[None])
            for i, m in enumerate([two, one, two])]
    items = routing_overlays(PipelineOutput([image], maps))
    expected = np.round(0.5 * PALETTE[1].astype(float))  # two of three layers route to identity 1
    assert (np.asarray(items[0][0]) == expected).all()
    assert [c for _, c in items] == ["image 1: all layers", "image 1: up 1.0", "image 1: up 1.1", "image 1: up 1.2"]
    assert short_layer_name("mid_block.attentions.0.transformer_blocks.0.attn2") == "mid 0"
