"""datamodules.qwen_captioner and `uniportrait-caption`, run offline on tiny random Qwen2-VL and
Qwen2.5-VL models.

Each model, its word-level tokenizer (with the Qwen chat template's special tokens), image and video
processors are built here and saved with ``save_pretrained``; nothing is downloaded. The models'
output rows for special tokens are zeroed, so their greedy replies (random words) are never empty.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.captions import load_caption_table
from datamodules.qwen_captioner import QwenCaptioner, caption_images, list_images, model_name
from datamodules.schema import decode_sample
from src.cli.caption import main as caption_main
from src.cli.prepare import main as prep_main
from tests.data import fixtures

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template (system turn, image placeholder, generation prompt), as shipped with the model
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL_DIR_NAME = "Tiny-Qwen2-VL"


def build_tiny_qwen_vl(path: Path, model_type: str = "qwen2_vl") -> Path:
    """Save a random Qwen2-VL or Qwen2.5-VL (`model_type`; 1 text layer, hidden 64; a 32-wide vision tower,
    patch 14, merge 2) with its processor."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = SPECIALS + ["[UNK]"] + "system user assistant You are helpful . photo person scene".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words + [f"w{i}" for i in range(200)]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE)
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}  # 4..16 vision tokens per image
    ids = {s: vocab[s] for s in SPECIALS}
    text = {
        "vocab_size": len(vocab), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "initializer_range": 0.5,  # large: replies depend on the image
    }
    vision = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "initializer_range": 0.5}
    if model_type == "qwen2_vl":
        vision |= {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}
        config_cls, model_cls, processor_cls = (transformers.Qwen2VLConfig,
                                                transformers.Qwen2VLForConditionalGeneration,
                                                transformers.Qwen2VLProcessor)
    else:  # qwen2_5_vl: windowed attention in block 0, full attention in block 1
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "window_size": 56,
                   "fullatt_block_indexes": [1]}
        config_cls, model_cls, processor_cls = (transformers.Qwen2_5_VLConfig,
                                                transformers.Qwen2_5_VLForConditionalGeneration,
                                                transformers.Qwen2_5_VLProcessor)
    processor = processor_cls(image_processor=transformers.Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                              video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
                              chat_template=CHAT_TEMPLATE)
    config = config_cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        model.lm_head.weight[list(ids.values())] = 0.0  # logit 0 for specials; the best random word beats it
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / MODEL_DIR_NAME)


@pytest.fixture(scope="module")
def tiny_qwen25(tmp_path_factory) -> Path:
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("qwen25") / "Tiny-Qwen2.5-VL", "qwen2_5_vl")


@pytest.fixture
def photos(tmp_path) -> Path:
    """Two photos with one face each (one in a sub-folder) and a truncated JPEG."""
    root = tmp_path / "photos"
    fixtures.save_jpeg(root / "astronaut/a1.jpg", fixtures.astronaut())
    fixtures.save_jpeg(root / "g1.jpg", fixtures.grace_hopper())
    (root / "broken.jpg").write_bytes(fixtures.corrupt_bytes())
    return root


def read_lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_caption_command_writes_resumes_and_feeds_preparation(tiny_qwen, photos, tmp_path):
    table = tmp_path / "captions.jsonl"
    argv = ["--input", str(photos), "--model", str(tiny_qwen), "--out", str(table), "--max-new-tokens", "6",
            "--batch-size", "2", "--device", "cpu", "--no-progress"]
    counts = caption_main(argv)
    assert (counts.inputs, counts.captioned, counts.unreadable, counts.existing) == (3, 2, 1, 0)
    rows = read_lines(table)
    assert sorted(r["key"] for r in rows) == ["astronaut/a1.jpg", "g1.jpg"]
    for r in rows:
        assert isinstance(r["caption"], str) and 1 <= len(r["caption"].split()) <= 6
        assert r["model"] == MODEL_DIR_NAME
    first = table.read_bytes()

    again = caption_main(argv)  # resume: everything readable is already there
    assert (again.captioned, again.existing, again.unreadable) == (0, 2, 1)
    assert table.read_bytes() == first

    # drop one line: only that key is captioned again, to the same text (greedy decoding)
    table.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    partial = caption_main(argv)
    assert (partial.captioned, partial.existing) == (1, 1)
    assert read_lines(table) == rows

    captions = load_caption_table(table)
    assert captions == {r["key"]: r["caption"] for r in rows}

    out = tmp_path / "shards"
    manifest = prep_main(["--input", str(photos), "--format", "folder", "--out", str(out), "--captions", str(table)])
    assert manifest["kept"] == 2 and manifest["dropped"]["unreadable"] == 1
    samples = {}
    with tarfile.open(out / manifest["completed_shards"][0]) as tf:
        groups: dict[str, dict] = {}
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {"__key__": key, "__url__": str(out)})[ext] = tf.extractfile(m).read()
    for g in groups.values():
        s = decode_sample(g)
        samples[s.source] = s
    assert {k: s.caption for k, s in samples.items()} == captions


@pytest.mark.parametrize("which", ["tiny_qwen", "tiny_qwen25"])
def test_batched_captions_equal_one_at_a_time(which, request):
    captioner = QwenCaptioner(request.getfixturevalue(which), max_new_tokens=6, device="cpu", dtype="float32")
    expected_cls = {"tiny_qwen": "Qwen2VLForConditionalGeneration", "tiny_qwen25": "Qwen2_5_VLForConditionalGeneration"}
    assert type(captioner.model).__name__ == expected_cls[which]
    square, wide = fixtures.astronaut(), fixtures.two_people()  # different numbers of vision tokens
    pils = [Image.fromarray(square), Image.fromarray(wide)]
    batch = captioner.processor(text=[captioner.chat_text()] * 2, images=pils, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # the batch really is padded
    together = captioner([square, wide])
    assert together == captioner([square]) + captioner([wide])
    assert together[0] != together[1]  # the reply depends on the image
    assert captioner([]) == []


def test_empty_replies_are_counted_not_written(tiny_qwen, photos, tmp_path):
    captioner = QwenCaptioner(tiny_qwen, max_new_tokens=3, device="cpu")
    with torch.no_grad():
        captioner.model.lm_head.weight.zero_()  # every logit 0: greedy picks id 0, <|endoftext|>, a special token
    table = tmp_path / "t.jsonl"
    counts = caption_images(captioner, list_images(photos), table, batch_size=3, progress=False)
    assert (counts.captioned, counts.empty, counts.unreadable) == (0, 2, 1)
    assert not table.exists() or table.read_text() == ""


def test_table_without_final_newline_is_continued_on_a_new_line(tiny_qwen, photos, tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"key": "g1.jpg", "caption": "an officer"}), encoding="utf-8")  # no "\n"
    captioner = QwenCaptioner(tiny_qwen, max_new_tokens=2, device="cpu")
    counts = caption_images(captioner, list_images(photos), table, progress=False)
    assert (counts.captioned, counts.existing) == (1, 1)
    assert set(load_caption_table(table)) == {"g1.jpg", "astronaut/a1.jpg"}


def test_list_file_keys_are_relative_to_root(photos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\nphotos/g1.jpg\n\nphotos/astronaut/a1.jpg\n{photos / 'g1.jpg'}\n", encoding="utf-8")
    assert [k for k, _ in list_images(listing)] == ["photos/astronaut/a1.jpg", "photos/g1.jpg"]  # sorted, deduped
    assert [k for k, _ in list_images(photos)] == ["astronaut/a1.jpg", "broken.jpg", "g1.jpg"]
    elsewhere = photos.parent / "elsewhere"  # relative lines resolve against --root; outside it: absolute
    assert [k for k, _ in list_images(listing, root=elsewhere)] == sorted(
        ["photos/astronaut/a1.jpg", "photos/g1.jpg", (photos / "g1.jpg").as_posix()])
    linked = tmp_path / "linked"  # a folder of symlinks to photos elsewhere: keyed inside the folder
    linked.mkdir()
    (linked / "x.jpg").symlink_to(photos / "g1.jpg")
    assert [k for k, _ in list_images(linked)] == ["x.jpg"]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")


def test_model_name_and_model_type_checks(tmp_path):
    d = tmp_path / "Qwen2-VL-2B-Instruct"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "blip"}))
    assert model_name(d) == "Qwen2-VL-2B-Instruct"
    assert model_name(d, {"_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"}) == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert model_name(d, {"_name_or_path": str(tmp_path)}) == "Qwen2-VL-2B-Instruct"  # a local path: not a name
    with pytest.raises(ValueError, match=r"config\.json: model_type 'blip'"):
        QwenCaptioner(d)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        QwenCaptioner(tmp_path)


def test_images_become_uint8_arrays_or_pil(tiny_qwen):
    captioner = QwenCaptioner(tiny_qwen, max_new_tokens=4, device="cpu")
    image = fixtures.astronaut(64)
    assert captioner([Image.fromarray(image)]) == captioner([np.asarray(image)])
