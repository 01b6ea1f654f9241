"""Released-layout weights <-> our modules: strict load, bit-exact round trip, safe unpickling."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from src.inference import convert
from src.models import adapters
from src.models.faceid_attention import FaceIDAttnProcessor
from tests.inference.helpers import RANK, one_thread, released_layout, tiny_embedding, write_released  # noqa: F401 (fixture)
from tests.models.tiny_unets import tiny_sd15_unet  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CROSS = 32


def _model(multi: bool = True):
    unet = tiny_sd15_unet(cross_attention_dim=CROSS)
    emb = tiny_embedding(id_dim=24, structure_dim=40, output_dim=CROSS, seed=3)
    convert.prepare_unet(unet, id_dim=CROSS, num_tokens=16, lora_rank=RANK, multi=multi)
    return unet, emb


def _fresh_embedding():
    return tiny_embedding(id_dim=24, structure_dim=40, output_dim=CROSS, seed=99)


def test_processor_order_is_down_up_mid_and_every_key_lands_where_the_doc_says(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stock = tiny_sd15_unet(cross_attention_dim=CROSS)
    names = list(stock.attn_processors)
    assert len(names) == 8
    first_up = min(i for i, n in enumerate(names) if n.startswith("up_blocks"))
    first_mid = min(i for i, n in enumerate(names) if n.startswith("mid_block"))
    assert first_up < first_mid  # diffusers registers up_blocks before mid_block

    fp, rp = write_released(tmp_path, stock, tiny_embedding(24, 40, CROSS, seed=3))
    unet, emb = _model()
    report = convert.load_released(fp, rp, unet, _fresh_embedding())
    faceid = torch.load(fp, weights_only=True)
    router = torch.load(rp, weights_only=True)["faceid_adapter"]
    assert report.lora_rank == RANK and report.has_router and report.processors == 8
    n_proj = len(faceid["faceid_proj"])
    assert report.files == {str(fp): len(faceid["faceid_adapter"]) + n_proj, str(rp): len(router)}
    for i, name in enumerate(names):
        attn = unet.get_submodule(name[: -len(".processor")])
        assert torch.equal(attn.to_q.lora_A["single_id"].weight,
                           faceid["faceid_adapter"][f"{i}.to_q_lora.down.weight"])
        assert torch.equal(attn.to_out[0].lora_B["single_id"].weight,
                           faceid["faceid_adapter"][f"{i}.to_out_lora.up.weight"])
        assert torch.equal(attn.to_v.lora_B["multi_id"].weight, router[f"{i}.to_v_lora.up.weight"])
        if name.endswith("attn2.processor"):
            proc = attn.processor
            assert isinstance(proc, FaceIDAttnProcessor)
            assert torch.equal(proc.to_k_faceid.weight, faceid["faceid_adapter"][f"{i}.to_k_faceid.weight"])
            assert torch.equal(proc.router.aggr_router.weight, router[f"{i}.aggr_router.weight"])
            assert torch.equal(proc.router.to_k_router[2].weight, router[f"{i}.to_k_router.2.weight"])


def test_every_adapter_parameter_is_filled(tmp_path: Path) -> None:
    fp, rp = write_released(tmp_path, tiny_sd15_unet(cross_attention_dim=CROSS), tiny_embedding(24, 40, CROSS, 3))
    unet, _ = _model()
    before = adapters.adapter_state_dict(unet)
    emb = _fresh_embedding()
    convert.load_released(fp, rp, unet, emb)
    after = adapters.adapter_state_dict(unet)
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []  # random released values overwrote every adapter parameter
    ref = torch.load(fp, weights_only=True)["faceid_proj"]
    assert all(torch.equal(v, ref[k]) for k, v in emb.state_dict().items())


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_export_then_load_round_trip_is_bit_exact(tmp_path: Path, suffix: str) -> None:
    fp, rp = write_released(tmp_path / "in", tiny_sd15_unet(cross_attention_dim=CROSS),
                            tiny_embedding(24, 40, CROSS, 3))
    unet, _ = _model()
    emb = _fresh_embedding()
    convert.load_released(fp, rp, unet, emb)
    out_f, out_r = tmp_path / f"out/faceid{suffix}", tmp_path / f"out/router{suffix}"
    convert.export_released(unet, emb, out_f, out_r)
    for src, dst in ((fp, out_f), (rp, out_r)):
        a, b = convert.read_released(src), convert.read_released(dst)
        assert set(a) == set(b)
        for section in a:
            assert set(a[section]) == set(b[section])
            for k in a[section]:
                assert a[section][k].dtype == b[section][k].dtype and torch.equal(a[section][k], b[section][k]), k
    if suffix == ".bin":  # the exported .bin is the released structure: plain dicts of tensors
        obj = torch.load(out_f, weights_only=True)
        assert set(obj) == {"faceid_proj", "faceid_adapter"}
    # and loading the export into fresh modules reproduces the same state
    unet2, _ = _model()
    emb2 = _fresh_embedding()
    convert.load_released(out_f, out_r, unet2, emb2)
    s1, s2 = adapters.adapter_state_dict(unet), adapters.adapter_state_dict(unet2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_faceid_only_file_loads_without_router(tmp_path: Path) -> None:
    fp, _ = write_released(tmp_path, tiny_sd15_unet(cross_attention_dim=CROSS), tiny_embedding(24, 40, CROSS, 3))
    unet, _ = _model(multi=False)
    report = convert.load_released(fp, None, unet, _fresh_embedding())
    assert not report.has_router and adapters.router_parameters(unet) == {}


def test_reference_renamed_multi_id_keys_are_accepted(tmp_path: Path) -> None:
    fp, rp = write_released(tmp_path, tiny_sd15_unet(cross_attention_dim=CROSS), tiny_embedding(24, 40, CROSS, 3))
    router = torch.load(rp, weights_only=True)["faceid_adapter"]
    renamed = {k.replace("_lora.", "_multi_id_lora."): v for k, v in router.items()}
    rp2 = tmp_path / "renamed.bin"
    torch.save({"faceid_adapter": renamed}, rp2)
    unet, _ = _model()
    convert.load_released(fp, rp2, unet, _fresh_embedding())
    attn = unet.get_submodule(next(iter(unet.attn_processors))[: -len(".processor")])
    assert torch.equal(attn.to_q.lora_A["multi_id"].weight, router["0.to_q_lora.down.weight"])


def test_missing_and_unexpected_keys_are_named_with_the_file(tmp_path: Path) -> None:
    stock = tiny_sd15_unet(cross_attention_dim=CROSS)
    emb = tiny_embedding(24, 40, CROSS, 3)
    faceid, _ = released_layout(stock, id_dim=CROSS)
    bad = dict(faceid)
    del bad["1.to_k_faceid.weight"]
    bad["99.to_q_lora.down.weight"] = torch.zeros(RANK, 8)
    path = tmp_path / "broken-faceid.bin"
    torch.save({"faceid_proj": emb.state_dict(), "faceid_adapter": bad}, path)
    unet, _ = _model(multi=False)
    with pytest.raises(KeyError) as info:
        convert.load_released(path, None, unet, _fresh_embedding())
    msg = str(info.value)
    assert "broken-faceid.bin" in msg and "1.to_k_faceid.weight" in msg and "99.to_q_lora.down.weight" in msg

    proj = dict(emb.state_dict())
    proj.pop("latents")
    path2 = tmp_path / "bad-proj.bin"
    torch.save({"faceid_proj": proj, "faceid_adapter": faceid}, path2)
    with pytest.raises(KeyError, match="bad-proj.bin.*latents"):
        convert.load_released(path2, None, unet, _fresh_embedding())


def test_shape_mismatch_names_key(tmp_path: Path) -> None:
    stock = tiny_sd15_unet(cross_attention_dim=CROSS)
    faceid, _ = released_layout(stock, id_dim=CROSS, rank=RANK + 1)  # wrong rank
    path = tmp_path / "rank.bin"
    torch.save({"faceid_proj": tiny_embedding(24, 40, CROSS, 3).state_dict(), "faceid_adapter": faceid}, path)
    unet, _ = _model(multi=False)
    with pytest.raises(ValueError, match=r"rank.bin: 0\.to_q_lora\.down\.weight has shape"):
        convert.load_released(path, None, unet, _fresh_embedding())


class _Exploit:
    """Unpickling this would call os.system: weights_only must refuse it."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"faceid_proj": {}, "faceid_adapter": {"x": _Exploit()}}, f)
    unet, _ = _model(multi=False)
    with pytest.raises(ValueError, match="evil.bin.*weights_only"):
        convert.load_released(path, None, unet, _fresh_embedding())


@pytest.mark.parametrize("name", ["junk.ckpt", "junk.bin", "junk.safetensors", "cut.safetensors", "cut.ckpt"])
def test_a_truncated_or_foreign_weight_file_is_an_error_naming_it(tmp_path: Path, name: str) -> None:
    """Text saved under a weights name, or a real file cut short: both readers (released files, our checkpoints)
    and the architecture check fail with a ValueError that starts with the path, not a bare library error."""
    from src.inference import arch

    path = tmp_path / name
    if name.startswith("junk"):
        path.write_text("not weights\n" * 20)
    else:
        whole = tmp_path / f"whole{path.suffix}"
        tensors = {"faceid_proj.w": torch.ones(64, 64)}
        if path.suffix == ".safetensors":
            save_file(tensors, str(whole))
        else:
            torch.save({"uniportrait": {"stage": 1}, "state_dict": tensors}, whole)
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    readers = [convert.read_checkpoint] if path.suffix == ".ckpt" else [convert.read_released, convert.read_checkpoint]
    if path.suffix == ".safetensors":
        readers.append(arch.released_arch)
    for read in readers:
        with pytest.raises(ValueError, match=f"^{path}: unreadable"):
            read(path)


def test_a_released_layout_file_given_as_our_checkpoint_says_which_option_takes_it(tmp_path: Path) -> None:
    path = tmp_path / "uniportrait-faceid_sd15.safetensors"
    save_file({"faceid_proj.proj_in.weight": torch.zeros(2, 2), "faceid_adapter.0.to_k_faceid.weight": torch.zeros(2)},
              str(path))
    with pytest.raises(KeyError, match="faceid_sd15.safetensors: not a UniPortrait adapter .*--released-faceid"):
        convert.read_checkpoint(path)


def test_safetensors_with_foreign_section_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    save_file({"image_proj.x": torch.zeros(1)}, str(path))
    with pytest.raises(KeyError, match="odd.safetensors.*image_proj.x"):
        convert.read_released(path)


def test_lora_scaling_must_be_one(tmp_path: Path) -> None:
    fp, _ = write_released(tmp_path, tiny_sd15_unet(cross_attention_dim=CROSS), tiny_embedding(24, 40, CROSS, 3))
    unet, _ = _model(multi=False)
    for m in unet.modules():
        if hasattr(m, "scaling") and "single_id" in getattr(m, "scaling", {}):
            m.scaling["single_id"] = 2.0
            break
    with pytest.raises(ValueError, match="scaling"):
        convert.load_released(fp, None, unet, _fresh_embedding())


def test_id_embedding_shape_is_read_from_the_state_dict() -> None:
    emb = tiny_embedding(24, 40, CROSS, seed=3)
    built = convert.id_embedding_from_state_dict(emb.state_dict(), dim_head=16)
    built.load_state_dict(emb.state_dict(), strict=True)
    assert built.layers[0][0].heads == emb.layers[0][0].heads and len(built.layers) == len(emb.layers)
    r, s = torch.randn(1, 49, 24), torch.randn(1, 9, 40)
    assert torch.equal(built(r, s, beta=0.3), emb(r, s, beta=0.3))


def _fake_lightning_ckpt(path: Path, stage: int) -> dict:
    unet, emb = _model(multi=stage == 2)
    state = {f"identity.embedding.{k}": v for k, v in emb.state_dict().items()}
    state.update({f"unet.{k}": torch.randn_like(v) for k, v in adapters.adapter_state_dict(unet).items()})
    ckpt = {"state_dict": state, "uniportrait": {"stage": stage, "format": 1},
            "hyper_parameters": {"lora_rank": RANK, "qformer": {"dim_head": 16, "heads": 4}}}
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize("stage", [1, 2])
def test_read_checkpoint_and_safetensors_export_agree(tmp_path: Path, stage: int) -> None:
    ckpt = _fake_lightning_ckpt(tmp_path / "last.ckpt", stage)
    a = convert.read_checkpoint(tmp_path / "last.ckpt")
    convert.export_checkpoint_safetensors(tmp_path / "last.ckpt", tmp_path / "model.safetensors")
    b = convert.read_checkpoint(tmp_path / "model.safetensors")
    assert a.stage == b.stage == stage and a.lora_rank == b.lora_rank == RANK and b.qformer["dim_head"] == 16
    for x, y in ((a.embedding, b.embedding), (a.unet, b.unet)):
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    n_unet = sum(k.startswith("unet.") for k in ckpt["state_dict"])
    assert len(a.unet) == n_unet
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="other.ckpt"):
        convert.read_checkpoint(tmp_path / "other.ckpt")
