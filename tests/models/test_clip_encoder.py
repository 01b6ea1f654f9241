"""CLIP patch encoder: penultimate patch tokens from open_clip and transformers towers, loading formats."""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from src.models.clip_encoder import ClipPatchEncoder

VISION = dict(image_size=32, patch_size=8, width=32, layers=3, head_width=8)
TEXT = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
EMBED = 16


def tiny_clip() -> open_clip.model.CLIP:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=EMBED, vision_cfg=VISION, text_cfg=TEXT).eval()
    with torch.no_grad():  # open_clip leaves LayerNorms at identity; perturb so ln_pre/ln_2 matter
        for n, p in model.visual.named_parameters():
            if "ln" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hooked_layers(visual: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs (B, 1+N, W) of every residual block of an open_clip tower, via forward hooks."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in visual.transformer.resblocks]
    with torch.no_grad():
        visual(x)
    for h in hooks:
        h.remove()
    return outs


def pixels(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_open_clip_vision_config_roundtrip_penultimate(tmp_path: Path) -> None:
    model = tiny_clip()
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    enc = ClipPatchEncoder.from_open_clip_vision_config(VISION, EMBED, checkpoint=path)
    assert (enc.width, enc.image_size, enc.grid, enc.num_patches) == (32, 32, 4, 16)
    x = pixels()
    out = enc(x)
    assert out.shape == (2, 16, 32)  # class token removed
    layers = hooked_layers(model.visual, x)
    assert torch.allclose(out, layers[-2][:, 1:], atol=1e-6)  # penultimate block, patch tokens
    assert not torch.allclose(out, layers[-1][:, 1:], atol=1e-3)  # not the last block


@pytest.mark.parametrize("fmt", ["wrapped_bin", "safetensors"])
def test_open_clip_checkpoint_formats(tmp_path: Path, fmt: str) -> None:
    model = tiny_clip()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "wrapped_bin":
        path = tmp_path / "clip.bin"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "clip.safetensors"
        save_file(sd, str(path))
    enc = ClipPatchEncoder.from_open_clip_vision_config(VISION, EMBED, checkpoint=path)
    x = pixels()
    assert torch.allclose(enc(x), hooked_layers(model.visual, x)[-2][:, 1:], atol=1e-6)


def test_open_clip_strict_errors(tmp_path: Path) -> None:
    sd = tiny_clip().state_dict()
    del sd["visual.transformer.resblocks.1.ln_1.weight"]
    sd["visual.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="broken.pt") as err:
        ClipPatchEncoder.from_open_clip_vision_config(VISION, EMBED, checkpoint=path)
    assert "visual.transformer.resblocks.1.ln_1.weight" in str(err.value) and "visual.extra" in str(err.value)
    torch.save({"text.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="no 'visual.' keys"):
        ClipPatchEncoder.from_open_clip_vision_config(VISION, EMBED, checkpoint=path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ClipPatchEncoder.from_open_clip_vision_config(VISION, EMBED, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ClipPatchEncoder.from_open_clip(tmp_path / "missing.pt")


def test_from_open_clip_builtin_name_with_overrides(tmp_path: Path) -> None:
    """create_model path (built-in name + local file) with the tiny config as overrides."""
    model = tiny_clip()
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    enc = ClipPatchEncoder.from_open_clip(
        path, "ViT-H-14", model_kwargs=dict(embed_dim=EMBED, vision_cfg=VISION, text_cfg=TEXT)
    )
    x = pixels()
    assert torch.allclose(enc(x), hooked_layers(model.visual, x)[-2][:, 1:], atol=1e-6)


def test_frozen_and_stays_eval() -> None:
    enc = ClipPatchEncoder.from_open_clip_vision_config({**VISION, "patch_dropout": 0.5}, EMBED)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.tower.training
    x = pixels()
    assert torch.equal(enc(x), enc(x))  # patch dropout inactive: deterministic, all patches kept
    assert enc(x).shape == (2, 16, 32)


def test_transformers_penultimate(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=16,
    )
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path / "image_encoder")
    enc = ClipPatchEncoder.from_transformers(tmp_path / "image_encoder")
    assert (enc.width, enc.image_size, enc.grid, enc.num_patches) == (32, 32, 4, 16)
    assert not any(p.requires_grad for p in enc.parameters())
    x = pixels()
    out = enc(x)
    with torch.no_grad():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert out.shape == (2, 16, 32)
    assert torch.allclose(out, hs[-2][:, 1:], atol=1e-6)
    assert not torch.allclose(out, hs[-1][:, 1:], atol=1e-3)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipPatchEncoder.from_transformers(tmp_path / "nowhere")


def test_rejects_wrong_input_size_and_tower_type() -> None:
    enc = ClipPatchEncoder.from_open_clip_vision_config(VISION, EMBED)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        enc(torch.randn(1, 3, 48, 48))
    with pytest.raises(TypeError, match="Linear"):
        ClipPatchEncoder(torch.nn.Linear(2, 2))


def test_from_open_clip_mismatch_names_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip().state_dict(), path)
    wrong = dict(embed_dim=EMBED, vision_cfg={**VISION, "width": 64}, text_cfg=TEXT)
    with pytest.raises(ValueError, match="tiny_clip.pt"):
        ClipPatchEncoder.from_open_clip(path, "ViT-H-14", model_kwargs=wrong)
