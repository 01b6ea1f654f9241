"""The generate CLI on the tiny world: --help, end-to-end PNGs, face-less photo error."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from src.cli import generate
from src.conventions import uint8_to_unit
from src.faces import load_rgb
from src.inference import io as inference_io
from src.inference import loading
from src.tiny import architectures
from tests.inference.helpers import one_thread, random_crops, tiny_embedding_for, write_released, write_tiny_world  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("gen_world")
    paths = write_tiny_world(root)
    fp, rp = write_released(root / "released", paths.build().unet, tiny_embedding_for(paths), seed=2)
    comps = {k: getattr(paths, k) for k in ("base_model", "clip_checkpoint", "face_backbone", "clip_vision_config",
                                            "clip_embed_dim", "face_num_layers", "face_embedding_size")}
    comps["face_widths"] = list(paths.face_widths)
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"components": comps}}))
    crops = []
    for i in range(2):
        crop = ((random_crops(1, seed=10 + i)[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
        path = root / f"crop{i}.png"
        Image.fromarray(crop.to(torch.uint8).numpy()).save(path)
        crops.append(path)
    return {"root": root, "faceid": fp, "router": rp, "config": cfg, "crops": crops}


def _base_args(world: dict, out: Path) -> list[str]:
    return ["--prompt", "a photo of a person", "--components", str(world["config"]),
            "--released-faceid", str(world["faceid"]), "--released-router", str(world["router"]),
            "--dim-head", "16", "--steps", "2", "--out", str(out), "--device", "cpu"]


def test_help_documents_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        generate.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    parser = generate.build_parser()
    options = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    expected = {"--prompt", "--negative-prompt", "--face", "--face-crop", "--out", "--checkpoint", "--released-faceid",
                "--released-router", "--components", "--base-model", "--face-scale", "--structure-scale", "--guidance",
                "--steps", "--seed", "--num-images", "--mask", "--routing-maps"}
    assert expected <= set(options)
    for opt in options:
        assert re.search(rf"{re.escape(opt)}\b", text), opt
    for action in parser._actions:  # every option has a help text
        assert action.help, action.option_strings


def test_two_identities_end_to_end_with_routing_maps(world: dict, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = _base_args(world, out) + ["--face-crop", str(world["crops"][0]), "--face-crop", str(world["crops"][1]),
                                     "--num-images", "2", "--routing-maps", "--seed", "3"]
    generate.main(args)
    images = sorted(out.glob("image_*.png"))
    assert [p.name for p in images] == ["image_00.png", "image_01.png"]
    assert Image.open(images[0]).size == (64, 64)
    maps = sorted((out / "routing").glob("*.png"))
    n_layers = 7  # tiny_unet: cross-attention in 1+1 down, 2+2 up and 1 mid transformer block
    assert len(maps) == 2 * n_layers
    colours = {tuple(c) for p in maps for c in np.asarray(Image.open(p)).reshape(-1, 3)}
    assert colours <= {tuple(inference_io.PALETTE[0]), tuple(inference_io.PALETTE[1])}  # one identity per position
    printed = capsys.readouterr().out.split()
    assert str(images[0]) in printed


def test_routing_maps_asked_for_where_nothing_is_routed_say_so(world: dict, tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    args = _base_args(world, out) + ["--face-crop", str(world["crops"][0]), "--face-crop", str(world["crops"][1]),
                                     "--routing-maps", "--face-scale", "0"]
    with caplog.at_level("WARNING", logger="src.cli.generate"):
        generate.main(args)  # face-ID attention off: the routers never run
    assert "no routing map is written" in caplog.text and not (out / "routing").exists()


def test_single_identity_with_several_reference_crops_and_base_model_override(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--face-crop a.png,b.png` is one identity with two references: the identity encoder gets both crops,
    in order, in one call (R = 2: one Q-Former run over both crops' tokens), and the image (same seed)
    differs from the image of either crop alone."""
    from src.models.identity_encoder import IdentityEncoder

    calls: list[torch.Tensor] = []
    encode = IdentityEncoder.forward

    def spy(self, recog: torch.Tensor, clip_crop: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(recog.detach().clone())
        return encode(self, recog, clip_crop, *args, **kwargs)

    monkeypatch.setattr(IdentityEncoder, "forward", spy)
    crops = ",".join(str(p) for p in world["crops"])
    images = {}
    for name, spec in (("both", crops), ("first", str(world["crops"][0])), ("second", str(world["crops"][1]))):
        out = tmp_path / name
        generate.main(_base_args(world, out) + ["--face-crop", spec, "--base-model", str(world["root"] / "base")])
        images[name] = np.asarray(Image.open(out / "image_00.png"))
    assert [tuple(c.shape[:2]) for c in calls] == [(1, 2), (1, 1), (1, 1)]  # one identity: 2, 1, 1 references
    pixels = [uint8_to_unit(load_rgb(p)) for p in world["crops"]]
    assert torch.equal(calls[0][0, 0], pixels[0]) and torch.equal(calls[0][0, 1], pixels[1])
    assert not np.array_equal(images["both"], images["first"])
    assert not np.array_equal(images["both"], images["second"])


def test_masks_must_match_identities(world: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mask = tmp_path / "m.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    with pytest.raises(SystemExit) as info:
        generate.main(_base_args(world, tmp_path / "o") + ["--face-crop", str(world["crops"][0]), "--face-crop",
                                                          str(world["crops"][1]), "--mask", str(mask)])
    assert info.value.code != 0 and "--mask given 1 times for 2 identities" in capsys.readouterr().err


def test_face_less_photo_exits_nonzero_naming_the_file(world: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    blank = tmp_path / "no_face_here.jpg"
    Image.new("RGB", (80, 80), (200, 200, 200)).save(blank)
    with pytest.raises(SystemExit) as info:
        generate.main(_base_args(world, tmp_path / "o") + ["--face", str(blank)])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "no_face_here.jpg" in err and "no face" in err
    assert not (tmp_path / "o").exists()



def must_not_load(*args, **kwargs):
    raise AssertionError("weights were loaded before the inputs were checked")


@pytest.mark.parametrize("flag", ["--face", "--face-crop", "--mask"])
def test_non_image_input_is_an_error_naming_it_before_any_weights_load(
    world: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    monkeypatch.setattr(generate, "load_weights", must_not_load)
    notes = tmp_path / "notes_not_a_photo.jpg"
    notes.write_text("these are meeting notes, not a JPEG")
    inputs = {"--face": ["--face", str(notes)], "--face-crop": ["--face-crop", str(notes)],
              "--mask": ["--face-crop", str(world["crops"][0]), "--mask", str(notes)]}[flag]
    with pytest.raises(SystemExit) as info:
        generate.main(_base_args(world, tmp_path / "o") + inputs)
    assert info.value.code == 2
    assert "notes_not_a_photo.jpg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["not_square", "no_file"])
def test_bad_face_crops_are_errors_naming_them_before_any_weights_load(
    world: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    monkeypatch.setattr(generate, "load_weights", must_not_load)
    wide = tmp_path / "wide_crop.png"
    Image.fromarray(np.zeros((90, 112, 3), np.uint8)).save(wide)
    spec, message = {"not_square": (str(wide), "wide_crop.png: an aligned face crop is square, this is 112x90"),
                     "no_file": (",", "--face-crop ',': no file named")}[case]
    with pytest.raises(SystemExit) as info:
        generate.main(_base_args(world, tmp_path / "o") + ["--face-crop", spec])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_one_persons_crops_of_different_sizes_are_stacked_at_the_largest(world: dict, tmp_path: Path) -> None:
    from src.inference.io import read_identities

    small = tmp_path / "small.png"
    Image.open(world["crops"][1]).resize((96, 96), Image.BICUBIC).save(small)
    (person,) = read_identities([("crop", f"{world['crops'][0]},{small}")])
    recog, _ = person.crops
    side = load_rgb(world["crops"][0]).shape[0]
    assert tuple(recog.shape) == (2, 3, side, side)
    assert torch.equal(recog[0], uint8_to_unit(load_rgb(world["crops"][0])))


def test_a_missing_router_file_is_named_before_any_network_is_built(
    world: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from src.models.presets import ComponentPaths

    def must_not_build(*args, **kwargs):
        raise AssertionError("the networks were built before the weight files were checked")

    monkeypatch.setattr(ComponentPaths, "build", must_not_build)
    args = _base_args(world, tmp_path / "o")
    args[args.index("--released-router") + 1] = str(tmp_path / "typo_router.bin")
    with pytest.raises(SystemExit) as info:
        generate.main(args + ["--face-crop", str(world["crops"][0]), "--face-crop", str(world["crops"][1])])
    assert info.value.code == 2 and "--released-router" in (err := capsys.readouterr().err) and "typo_router.bin" in err


def test_components_yaml_forms(world: dict, tmp_path: Path) -> None:
    cfg = yaml.safe_load(world["config"].read_text())["model"]["components"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    a = loading.load_components(plain, None)
    b = loading.load_components(world["config"], "/elsewhere/base")
    assert a.base_model == cfg["base_model"] and b.base_model == "/elsewhere/base"
    assert a.face_widths == tuple(architectures.TINY_FACE_WIDTHS)
    stage2 = tmp_path / "stage2.yaml"  # a stage config: its components come from the config it inherits
    stage2.write_text(yaml.safe_dump({"inherits": str(world["config"]), "model": {"stage": 2}}))
    assert vars(loading.load_components(stage2, None)) == vars(loading.load_components(world["config"], None))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"components": {"not_a_key": 1}}))
    with pytest.raises(ValueError, match="bad.yaml"):
        loading.load_components(bad, None)


def test_missing_default_checkpoint_is_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="make demo"):
        loading.default_checkpoint(tmp_path / "runs")
