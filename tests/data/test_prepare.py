"""datamodules.prepare and datamodules.captions, run for real (MTCNN on CPU) on real photographs."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules.prepare.run as prepare_run
from datamodules.captions import CaptionFileError, VLMCaptioner, key_candidates, load_caption_table, lookup_caption
from datamodules.prepare.config import PrepareConfig, PrepareError
from datamodules.prepare.image import REASONS, select_faces
from datamodules.prepare.sources.wds import resolve_tars
from datamodules.schema import REQUIRED_KEYS, Sample, decode_sample
from src.cli.prepare import main as prep_main
from src.faces import box_mask
from tests.data import fixtures

# ----------------------------------------------------------------------------------------------
# helpers


def read_shard(path: Path) -> list[Sample]:
    """Decode every sample of a shard with the schema's reader (grouping members by key)."""
    groups: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {"__key__": key, "__url__": str(path)})[ext] = tf.extractfile(m).read()
    for g in groups.values():
        assert set(REQUIRED_KEYS) <= set(g), f"{path}: {g['__key__']} lacks fields"
    return [decode_sample(g) for g in groups.values()]


def read_all(out: Path, manifest: dict) -> dict[str, Sample]:
    """{source key: sample} over the manifest's completed shards."""
    samples = {}
    for name in manifest["completed_shards"]:
        for s in read_shard(out / name):
            samples[s.source] = s
    return samples


def expected_drops(outcomes: list[str]) -> dict[str, int]:
    counts = {r: 0 for r in REASONS}
    for o in outcomes:
        if o != "kept":
            counts[o] += 1
    return counts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def check_sample_geometry(s: Sample, clip_size: int = 224) -> None:
    """Every face has a mask equal to its box, aligned crops of the right shapes, landmarks in frame."""
    h, w = s.image.shape[:2]
    n = len(s.faces)
    assert (s.masks.shape == (n, h, w) and s.recog.shape == (n, 112, 112, 3)
            and s.clip.shape == (n, clip_size, clip_size, 3))
    for i, f in enumerate(s.faces):
        assert np.array_equal(s.masks[i], box_mask(h, w, f.box))
        lm = np.asarray(f.landmarks)
        assert lm.shape == (5, 2) and (lm[:, 0] >= 0).all() and (lm[:, 0] < w).all() and (lm[:, 1] < h).all()
        assert lm[0, 0] < lm[1, 0]  # left eye on the image left
        assert s.recog[i].std() > 10 and s.clip[i].std() > 10  # real content, not an empty warp


# ----------------------------------------------------------------------------------------------
# folder of images with identity sub-folders


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("folder")
    expected = fixtures.make_folder(root / "photos")
    captions = write_jsonl(root / "captions.jsonl",
                           [{"key": "astronaut/a1.jpg", "caption": "an astronaut in a white suit"}])
    out = root / "out"
    argv = ["--input", str(root / "photos"), "--format", "folder", "--out", str(out), "--captions", str(captions),
            "--samples-per-shard", "3"]
    manifest = prep_main(argv)
    return out, manifest, expected


def test_folder_manifest_counts_by_reason(folder_run):
    out, manifest, expected = folder_run
    assert manifest["inputs"] == len(expected)
    assert manifest["kept"] == sum(o == "kept" for o in expected.values())
    assert manifest["dropped"] == expected_drops(list(expected.values()))
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["dropped"] == manifest["dropped"] and on_disk["finished"] is True
    # 7 inputs at 3 per shard -> 3 shards, all complete, no temporary file left
    assert manifest["completed_shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *manifest["completed_shards"]]
    assert sum(s["inputs"] for s in manifest["shards"].values()) == len(expected)
    assert manifest["throughput"]["images"] == len(expected) and manifest["throughput"]["images_per_s"] > 0


def test_folder_samples_decode_with_identities_and_captions(folder_run):
    out, manifest, expected = folder_run
    samples = read_all(out, manifest)
    assert sorted(samples) == sorted(k for k, o in expected.items() if o == "kept")
    for src, s in samples.items():
        assert len(s.faces) == 1
        assert s.faces[0].identity == src.split("/")[0]  # sub-folder name
        assert s.faces[0].prob >= 0.9
        check_sample_geometry(s)
    assert samples["astronaut/a1.jpg"].caption == "an astronaut in a white suit"  # JSONL
    assert samples["grace/g1.jpg"].caption == "Grace Hopper in uniform"  # sidecar source text
    assert samples["astronaut/a2_mirror.jpg"].caption == "a photo of a person"  # default template
    keys = [s.key for s in samples.values()]
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys)


def test_folder_mirrored_photo_has_mirrored_face(folder_run):
    out, manifest, _ = folder_run
    samples = read_all(out, manifest)
    a, m = samples["astronaut/a1.jpg"], samples["astronaut/a2_mirror.jpg"]
    w = a.image.shape[1]
    box_a, box_m = np.asarray(a.faces[0].box), np.asarray(m.faces[0].box)
    assert np.allclose([w - box_a[2], w - box_a[0]], box_m[[0, 2]], atol=4)


# ----------------------------------------------------------------------------------------------
# img2dataset-style shards


@pytest.fixture(scope="module")
def wds_run(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wds")
    expected = fixtures.make_img2dataset_tar(root / "shards/00000.tar")
    captions = write_jsonl(root / "qwen.jsonl", [{"image": "000000001", "text": "a smiling officer in a navy uniform"}])
    out = root / "out"
    argv = ["--input", str(root / "shards"), "--format", "wds", "--out", str(out), "--captions", str(captions),
            "--resolution-max", "200", "--min-face-size", "20"]
    return out, prep_main(argv), expected


def test_wds_counts_captions_and_resolution(wds_run):
    out, manifest, expected = wds_run
    assert manifest["dropped"] == expected_drops([e["outcome"] for e in expected.values()])
    samples = {s.source.split("/")[-1]: s for s in read_all(out, manifest).values()}
    assert sorted(samples) == sorted(k for k, e in expected.items() if e["outcome"] == "kept")
    assert samples["000000000"].caption == expected["000000000"]["text"]  # source txt
    assert samples["000000001"].caption == "a smiling officer in a navy uniform"  # JSONL overrides txt
    for s in samples.values():
        assert max(s.image.shape[:2]) == 200  # downscaled to --resolution-max
        assert s.faces[0].identity is None
        check_sample_geometry(s)


def test_a_truncated_wds_tar_keeps_what_it_read_and_counts_the_rest_as_dropped(tmp_path, caplog):
    """A partly downloaded img2dataset tar (cut in the middle) beside a whole one: the run goes on;
    the damaged tar's readable samples are kept and the damage is one counted, logged `unreadable` input."""
    whole = fixtures.make_img2dataset_tar(tmp_path / "in/00001.tar", start=100)
    fixtures.make_img2dataset_tar(tmp_path / "full.tar")
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "in/00000.tar").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        manifest = prep_main(["--input", str(tmp_path / "in"), "--format", "wds", "--out", str(tmp_path / "out"),
                              "--resolution-max", "200", "--min-face-size", "20"])
    assert "00000.tar: unreadable tar" in caplog.text
    kept = sorted(s.source for s in read_all(tmp_path / "out", manifest).values())
    assert [k for k in kept if k.startswith("00001.tar")] == \
        sorted(f"00001.tar/{k}" for k, e in whole.items() if e["outcome"] == "kept")
    assert any(k.startswith("00000.tar/") for k in kept)  # what the damaged tar held before the cut
    assert manifest["dropped"]["unreadable"] == expected_drops([e["outcome"] for e in whole.values()])["unreadable"] + 1


def test_resolve_tars_patterns(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    assert [p.name for p in resolve_tars(str(tmp_path))] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.name for p in resolve_tars(str(tmp_path / "{00000..00001}.tar"))] == ["00000.tar", "00001.tar"]
    assert [p.name for p in resolve_tars(str(tmp_path / "*2.tar"))] == ["00002.tar"]
    with pytest.raises(PrepareError, match="nothing_here"):
        resolve_tars(str(tmp_path / "nothing_here/*.tar"))


# ----------------------------------------------------------------------------------------------
# CelebA layout


def test_celeba_identities_and_landmark_fallback(tmp_path):
    torch.manual_seed(0)
    expected = fixtures.make_celeba(tmp_path / "celeba", n_eval=1)
    out = tmp_path / "out"
    manifest = prep_main(["--input", str(tmp_path / "celeba"), "--format", "celeba", "--out", str(out)])
    assert manifest["dropped"] == expected_drops([e["outcome"] for e in expected.values()])
    assert manifest["landmark_fallback"] == 1
    samples = read_all(out, manifest)
    assert sorted(samples) == sorted(k for k, e in expected.items() if e["outcome"] == "kept")
    for name, s in samples.items():
        assert s.faces[0].identity == expected[name]["identity"]
        if name != "200001.jpg":
            check_sample_geometry(s)
    # the face-less image was kept from its annotated landmarks, exactly as written in the file
    fb = samples["200001.jpg"].faces[0]
    assert np.allclose(fb.landmarks, expected["200001.jpg"]["landmarks"])
    lm = np.asarray(fb.landmarks)
    assert (np.asarray(fb.box[:2]) <= lm.min(0)).all() and (np.asarray(fb.box[2:]) >= lm.max(0)).all()


def test_celeba_without_fallback_drops_faceless(tmp_path):
    expected = fixtures.make_celeba(tmp_path / "celeba", n_eval=0)
    manifest = prep_main(["--input", str(tmp_path / "celeba"), "--format", "celeba", "--out", str(tmp_path / "out"),
                          "--no-landmark-fallback"])
    assert manifest["landmark_fallback"] == 0
    assert manifest["dropped"]["no_face"] == 2
    assert manifest["kept"] == sum(e["outcome"] == "kept" for e in expected.values()) - 1


def test_celeba_missing_layout_is_a_clear_error(tmp_path):
    with pytest.raises(PrepareError, match="img_align_celeba"):
        prep_main(["--input", str(tmp_path), "--format", "celeba", "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------
# resume, temporary names, settings checks


def small_folder(root: Path) -> Path:
    """Three inputs: two faces and one face-less photo, sorted a.jpg, b.jpg, c.jpg."""
    fixtures.save_jpeg(root / "a.jpg", fixtures.astronaut())
    fixtures.save_jpeg(root / "b.jpg", fixtures.faceless("coffee"))
    fixtures.save_jpeg(root / "c.jpg", fixtures.grace_hopper())
    return root


def test_tmp_name_then_rename_and_resume(tmp_path, monkeypatch):
    torch.manual_seed(0)
    photos = small_folder(tmp_path / "photos")
    out = tmp_path / "out"
    argv = ["--input", str(photos), "--format", "folder", "--out", str(out), "--samples-per-shard", "1"]
    real_process = prepare_run.process_item
    seen: list[tuple[int, set[str]]] = []

    def spying_process(index, item, *args, **kwargs):
        seen.append((index, {p.name for p in out.iterdir()}))
        if index == 2:
            raise RuntimeError("simulated crash while writing shard 2")
        return real_process(index, item, *args, **kwargs)

    monkeypatch.setattr(prepare_run, "process_item", spying_process)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prep_main(argv)
    for index, names in seen:  # while shard i is written only its temporary name exists
        assert f"shard-{index:06d}.tar.tmp" in names and f"shard-{index:06d}.tar" not in names
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    partial = json.loads((out / "manifest.json").read_text())
    assert partial["completed_shards"] == ["shard-000000.tar", "shard-000001.tar"] and partial["finished"] is False
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in partial["completed_shards"]}

    monkeypatch.setattr(prepare_run, "process_item", real_process)
    manifest = prep_main(argv)
    assert manifest["completed_shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes  # completed shards untouched
    assert manifest["throughput"]["images"] == 1  # only the missing shard's input was processed
    assert manifest["kept"] == 2 and manifest["dropped"]["no_face"] == 1
    assert [s.source for s in read_shard(out / "shard-000002.tar")] == ["c.jpg"]

    # a completed shard whose file vanished is redone; nothing else is
    (out / "shard-000000.tar").unlink()
    again = prep_main(argv)
    assert again["throughput"]["images"] == 1 and (out / "shard-000000.tar").is_file()
    assert again["dropped"] == manifest["dropped"] and again["kept"] == manifest["kept"]

    # different settings or changed inputs are refused, naming what changed
    with pytest.raises(PrepareError, match="min_prob"):
        prep_main(argv + ["--min-prob", "0.5"])
    fixtures.save_jpeg(photos / "0.jpg", fixtures.astronaut(64))  # sorts first: shifts every slot
    with pytest.raises(PrepareError, match="shard-000000.tar: its inputs changed"):
        prep_main(argv)
    (photos / "0.jpg").unlink()
    (photos / "c.jpg").unlink()  # fewer inputs: the manifest's last shard no longer has a slot
    with pytest.raises(PrepareError, match="shard-000002.tar"):
        prep_main(argv)


def test_help_documents_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        prep_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--format", "folder", "wds", "celeba", "--captions", "--min-face-size", "manifest.json",
                 "too_many_faces"):
        assert word in text


def test_invalid_settings_are_named(tmp_path):
    with pytest.raises(PrepareError, match="max-faces"):
        prep_main(["--input", str(tmp_path), "--format", "folder", "--out", str(tmp_path / "o"),
                   "--min-faces", "2", "--max-faces", "1"])
    with pytest.raises(PrepareError, match="no images"):
        prep_main(["--input", str(tmp_path), "--format", "folder", "--out", str(tmp_path / "o")])


def test_select_faces_reasons_in_order():
    from src.faces import DetectedFace

    def face(size: float, prob: float) -> DetectedFace:
        return DetectedFace(np.array([0, 0, size, size], np.float32), np.zeros((5, 2), np.float32), prob)

    cfg = PrepareConfig(input=".", format="folder", out=".", min_faces=1, max_faces=1, min_face_size=32,
                        min_prob=0.9)
    assert select_faces([], cfg)[1] == "no_face"
    assert select_faces([face(100, 0.5)], cfg)[1] == "low_confidence"
    assert select_faces([face(20, 0.99)], cfg)[1] == "too_small"
    assert select_faces([face(100, 0.99), face(80, 0.95)], cfg)[1] == "too_many_faces"
    kept, reason = select_faces([face(100, 0.99), face(20, 0.99), face(90, 0.3)], cfg)
    assert reason is None and len(kept) == 1 and kept[0].short_side == 100  # small / unsure ones ignored
    cfg.min_faces, cfg.max_faces = 2, 3
    assert select_faces([face(100, 0.99)], cfg)[1] == "too_few_faces"


# ----------------------------------------------------------------------------------------------
# captions


def test_load_caption_table(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text(
        '{"key": "a/1.jpg", "caption": " first "}\n\n{"image": "0002", "text": "second"}\n'
        '{"key": "a/1.jpg", "caption": "updated"}\n',
        encoding="utf-8",
    )
    assert load_caption_table(path) == {"a/1.jpg": "updated", "0002": "second"}


@pytest.mark.parametrize(
    "bad_line, message",
    [("{not json", "not valid JSON"), ('["a", "b"]', "JSON object"), ('{"caption": "x"}', "'key' or 'image'"),
     ('{"key": "k", "caption": 3}', "'caption' or 'text'")],
)
def test_bad_caption_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"key": "ok", "caption": "fine"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(CaptionFileError, match=rf"caps\.jsonl:3: .*{message}"):
        load_caption_table(path)


def test_caption_lookup_spellings():
    assert key_candidates("alice/001.jpg") == ["alice/001.jpg", "alice/001", "001.jpg", "001"]
    table = {"001": "by stem", "bob/7.png": "by path"}
    assert lookup_caption(table, "alice/001.jpg") == "by stem"
    assert lookup_caption(table, "bob/7.png") == "by path"
    assert lookup_caption(table, "carol/9.jpg") is None


def make_tiny_blip(path: Path) -> Path:
    """A random tiny BlipForConditionalGeneration + BlipProcessor (BERT word-piece vocab), saved offline."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photography", "of", "person", "woman", "man",
             "smiling", "the", "photo", "with", "hat"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return make_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


def test_vlm_captioner_runs_a_local_model(tiny_blip):
    captioner = VLMCaptioner(str(tiny_blip), prompt="a photography of", max_new_tokens=4)
    image = fixtures.astronaut(64)
    caption = captioner(image)
    assert caption.startswith("a photography of") and len(caption.split()) > 3  # prompt + generated words
    assert captioner(image) == caption  # greedy decoding: deterministic
    assert VLMCaptioner(str(tiny_blip), prompt="the photo", max_new_tokens=4)(image).startswith("the photo")


def test_vlm_captioner_missing_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_model_here"):
        VLMCaptioner(str(tmp_path / "no_model_here"))


def test_prepare_with_captioner_and_two_faces(tmp_path, tiny_blip):
    """JSONL beats the captioner, the captioner beats source text; --max-faces 2 keeps both faces."""
    torch.manual_seed(0)
    photos = tmp_path / "photos"
    fixtures.save_jpeg(photos / "group.jpg", fixtures.two_people())
    fixtures.save_jpeg(photos / "grace/g1.jpg", fixtures.grace_hopper())
    (photos / "grace/g1.txt").write_text("source text that the captioner replaces", encoding="utf-8")
    captions = write_jsonl(tmp_path / "caps.jsonl", [{"key": "group", "caption": "two pioneers side by side"}])
    out = tmp_path / "out"
    manifest = prep_main(["--input", str(photos), "--format", "folder", "--out", str(out), "--captions", str(captions),
                          "--captioner", str(tiny_blip), "--max-faces", "2", "--clip-size", "160"])
    samples = read_all(out, manifest)
    assert manifest["kept"] == 2
    group, g1 = samples["group.jpg"], samples["grace/g1.jpg"]
    assert group.caption == "two pioneers side by side"
    assert g1.caption.startswith("a photography of") and g1.caption != "source text that the captioner replaces"
    assert len(group.faces) == 2 and len(g1.faces) == 1
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in group.faces]
    assert areas[0] > areas[1]  # largest first
    assert [f.identity for f in group.faces] == [None, None] and g1.faces[0].identity == "grace"
    assert not (group.masks[0] & group.masks[1]).any()  # two people side by side: disjoint masks
    check_sample_geometry(group, clip_size=160)


def test_tiny_stage1_trains_from_shards_prepared_from_real_photos(folder_run, tiny_world, tmp_path):
    """One shard schema: the tiny stage-1 config trains (2 steps through the real CLI) on shards this
    preparation made from real photographs."""
    from src.cli.train import main
    from tests.helpers import tiny_args

    out, manifest, _ = folder_run
    pattern = str(out / "shard-{000000..000002}.tar")
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "stage1.yaml"
    cli = main(["fit", f"--config={config}", *tiny_args(tiny_world), f"--data.train_shards={pattern}",
                "--data.val_shards=null", "--data.batch_size=2", "--model.qformer.depth=1", "--model.lora_rank=4",
                "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
