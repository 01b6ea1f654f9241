"""UniPortraitModule behaviour on the tiny world: parameter groups, stages, conditioning, checkpoints."""
from __future__ import annotations

import pytest
import torch

from src.models import adapters
from src.models.id_embedding import QFormerSpec
from src.module import MULTI, SINGLE, UniPortraitModule
from src.tiny import tiny_components


def make_module(world, **kw) -> UniPortraitModule:
    torch.manual_seed(0)
    kw.setdefault("qformer", QFormerSpec(depth=1, width=32, heads=2, dim_head=16))
    kw.setdefault("lora_rank", 4)
    kw.setdefault("lr", 1e-3)
    return UniPortraitModule(components=tiny_components(world), **kw)


def batch_from(world, multi: bool = False, n: int = 4):
    from datamodules.datamodule import FaceShardDataModule

    split = "multi_seen" if multi else "single_seen"
    dm = FaceShardDataModule(
        train_shards=str(world / "data" / "heldout" / f"{split}-000000.tar"),
        val_shards=str(world / "data" / "heldout" / f"{split}-000000.tar"),
        multi_id=multi, resolution=64, batch_size=n, num_workers=0, shuffle_buffer=0,
    )
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def trainable(module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def grouped(groups) -> set[int]:
    return {id(p) for g in groups for p in g["params"]}


@pytest.fixture(scope="module")
def module(tiny_world):
    return make_module(tiny_world)


def test_stage1_optimizer_holds_exactly_the_trainable_parameters(module):
    module.configure_stage(1)
    groups = module.param_groups()
    assert {g["name"] for g in groups} == {"id_embedding", "faceid_attention", "lora_single_id"}
    assert grouped(groups) == trainable(module)
    # frozen base networks contribute nothing
    assert not any(p.requires_grad for p in module.vae.parameters())
    assert not any(p.requires_grad for p in module.text_encoder.parameters())
    assert not any(p.requires_grad for p in module.identity.face.parameters())
    assert not any(p.requires_grad for p in module.identity.clip.parameters())
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable(module)


def test_stage1_group_learning_rates_follow_their_scales(tiny_world):
    m = make_module(tiny_world, lr=2e-3, lora_lr_scale=0.5, id_embedding_lr_scale=0.1)
    lrs = {g["name"]: g["lr"] for g in m.param_groups()}
    assert lrs == pytest.approx({"id_embedding": 2e-4, "faceid_attention": 2e-3, "lora_single_id": 1e-3})
    opt = m.configure_optimizers()
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(lrs)
    with pytest.raises(ValueError, match=r"model.id_embedding_lr_scale must be in \[0, inf\], got -0.1"):
        make_module(tiny_world, id_embedding_lr_scale=-0.1)
    with pytest.raises(ValueError, match=r"model.p_drop_face must be in \[0, 1.0\], got 1.5"):
        make_module(tiny_world, p_drop_face=1.5)


def test_stage2_groups_freeze_id_embedding_and_scale_lora_lr(tiny_world):
    m = make_module(tiny_world, stage=2, lr=2e-3, stage2_lora_lr_scale=0.1)
    groups = {g["name"]: g for g in m.param_groups()}
    assert set(groups) == {"router", "lora_multi_id"}
    assert groups["lora_multi_id"]["lr"] == pytest.approx(0.1 * groups["router"]["lr"])
    assert grouped(groups.values()) == trainable(m)
    assert not any(p.requires_grad for p in m.identity.embedding.parameters())
    assert not any(p.requires_grad for p in adapters.lora_parameters(m.unet, SINGLE).values())
    assert not any(p.requires_grad for p in adapters.faceid_parameters(m.unet).values())
    # multi_id starts as a copy of single_id
    single = adapters.lora_parameters(m.unet, SINGLE)
    multi = adapters.lora_parameters(m.unet, MULTI)
    for name, p in single.items():
        assert torch.equal(p, multi[name.replace(SINGLE, MULTI)])



def test_lr_scheduler_steps_per_optimizer_step_and_keeps_the_lora_ratio(tiny_world):
    from src.schedules import WarmupCosine

    m = make_module(tiny_world, stage=2, lr=2e-3, lr_scheduler=lambda opt: WarmupCosine(opt, total_steps=6,
                                                                                        warmup_steps=2, min_ratio=0.1))
    conf = m.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"  # not Lightning's default "epoch"
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(8):
        groups = {g["name"]: g["lr"] for g in opt.param_groups}
        assert groups["lora_multi_id"] == pytest.approx(0.1 * groups["router"])
        lrs.append(groups["router"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(2e-3)  # warm-up to the peak
    assert all(a > b for a, b in zip(lrs[2:6], lrs[3:7]))  # cosine decay
    assert lrs[6] == lrs[7] == pytest.approx(0.1 * 2e-3)  # floor after total_steps


def test_gumbel_temperature_anneals_over_the_steps_of_stage_2(tiny_world):
    from types import SimpleNamespace

    from src.models.router import schedule_tau

    m = make_module(tiny_world, stage=1, gumbel_tau=1.0, gumbel_tau_end=0.25, gumbel_tau_steps=4)
    trainer = SimpleNamespace(global_step=10)
    m._trainer = trainer  # a stage switch at global step 10
    m.configure_stage(2)
    assert m.stage_start_step == 10
    m.train()
    seen = []
    for step in (10, 12, 14, 20):
        trainer.global_step = step
        ctx = m._context(torch.zeros(1, 2, 16, 8), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 4, 8, 8), None)
        seen.append(ctx.gumbel_tau)
    assert seen == [pytest.approx(schedule_tau(s, 1.0, 0.25, 4)) for s in (0, 2, 4, 10)]
    assert seen[0] == pytest.approx(1.0) and seen[2] == seen[3] == pytest.approx(0.25)
    m.eval()
    assert m._context(torch.zeros(1, 2, 16, 8), None, torch.zeros(1, 4, 8, 8), None).gumbel_tau is None  # argmax
    m._trainer = None
    with pytest.raises(ValueError, match="must be > 0"):
        make_module(tiny_world, gumbel_tau_end=0.0, gumbel_tau_steps=4)


OPTIONS = {"gradient_checkpointing": {"gradient_checkpointing": True}, "channels_last": {"channels_last": True},
           "compile_unet": {"compile_unet": True, "compile_backend": "aot_eager"}}


# compiling (aot_eager) takes ~40 s on 2 cores: in the slow suite
@pytest.mark.parametrize(
    "option", [pytest.param(o, marks=pytest.mark.slow) if o == "compile_unet" else o for o in OPTIONS])
def test_speed_and_memory_options_leave_the_loss_and_gradients_unchanged(tiny_world, option):
    """Stage 2 (router with Gumbel samples, routing loss, multi-ID LoRA): the same loss and gradients
    with the option on as off; and the option is really in effect."""
    batch = batch_from(tiny_world, multi=True)
    runs = []
    for on in (False, True):
        m = make_module(tiny_world, stage=2, **(OPTIONS[option] if on else {}))
        m.train()
        torch.manual_seed(1)
        out = m.shared_step(batch)
        out["loss"].backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        runs.append((out, grads, m))
    (off, g_off, _), (on, g_on, m_on) = runs
    if option == "gradient_checkpointing":
        assert m_on.unet.is_gradient_checkpointing
    elif option == "channels_last":
        assert m_on.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    else:
        assert m_on.unet._compiled_call_impl is not None
        assert set(m_on.adapter_state_dict()) == set(runs[0][2].adapter_state_dict())  # checkpoints unchanged
    assert float(off["routing"]) > 0
    for k in ("diffusion", "routing"):
        torch.testing.assert_close(on[k], off[k], rtol=1e-5, atol=1e-7)
    assert set(g_on) == set(g_off) and all(g is not None for g in g_off.values())
    for n, g in g_off.items():
        torch.testing.assert_close(g_on[n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_frozen_weights_in_bf16_keep_the_adapters_fp32_and_the_loss_close(tiny_world):
    """`frozen_dtype: bfloat16`: base networks stored in bf16, every trained parameter (stage-2 routers and the
    multi-ID LoRA added at the switch included) in fp32 with fp32 gradients; the step runs outside any outer
    autocast (the module autocasts its own forwards) and its loss stays near the fp32 model's."""
    batch = batch_from(tiny_world, multi=True)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        m = make_module(tiny_world, stage=2, frozen_dtype=dtype)
        m.train()
        torch.manual_seed(1)
        out = m.shared_step(batch)
        out["loss"].backward()
        losses[dtype] = out
    want = torch.float32 if dtype == "float32" else torch.bfloat16
    for net in (m.vae, m.text_encoder, m.identity.face, m.identity.clip):
        assert {p.dtype for p in net.parameters()} == {want}
    assert m.unet.conv_in.weight.dtype == want
    trained = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trained and adapters.router_parameters(m.unet)
    for n, p in trained:
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
    for name in adapters.lora_names(m.unet):
        assert all(p.dtype == torch.float32 for p in adapters.lora_parameters(m.unet, name).values()), name
    for k in ("diffusion", "routing"):
        assert torch.isfinite(losses["bfloat16"][k])
        torch.testing.assert_close(losses["bfloat16"][k].float(), losses["float32"][k].float(), rtol=0.05, atol=0.02)
    with torch.no_grad():
        own, other = m.identity_gap(batch_from(tiny_world))  # a probe, called outside the training step
    assert torch.isfinite(own).all() and torch.isfinite(other).all()
    with pytest.raises(ValueError, match="model.frozen_dtype"):
        make_module(tiny_world, frozen_dtype="bf16")


def test_a_force_upcast_vae_encodes_in_fp32_under_float16(tiny_world):
    """SDXL's VAE overflows in float16 and its config says `force_upcast`: with `frozen_dtype: float16` it stays
    fp32 (the other frozen networks go fp16), and under Lightning's `16-mixed` autocast it still encodes in fp32:
    the latents equal the fp32 model's."""
    m = make_module(tiny_world, frozen_dtype="float16")
    assert m.vae.config.force_upcast and m.vae.dtype == torch.float32 and m.unet.conv_in.weight.dtype == torch.float16
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = make_module(tiny_world).encode_images(image)
    with torch.autocast("cpu", dtype=torch.float16):
        mixed = m.encode_images(image)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_noise_is_added_in_fp32_under_a_bf16_frozen_base(tiny_world):
    """With bf16 latents (`frozen_dtype: bfloat16`), the noisy latents are still sqrt(a_t) x + sqrt(1 - a_t) e
    computed in fp32: in bf16 the noise level of the first timesteps rounds away (t = 0, 1 returned x itself)."""
    m = make_module(tiny_world, frozen_dtype="bfloat16")
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    noise, t, noisy = m._sample_noise(latents, torch.Generator().manual_seed(1))
    a = m.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    want = a.sqrt() * latents.double() + (1 - a).sqrt() * noise.double()
    assert noisy.dtype == noise.dtype == torch.float32
    torch.testing.assert_close(noisy.double(), want, rtol=1e-5, atol=1e-6)


def test_adapters_added_at_the_stage_switch_take_the_other_adapters_dtype(tiny_world):
    """The routers and multi-ID LoRA created by `configure_stage(2)` mid-run take the dtype the adapters have by
    then, and the stage-1 adapters keep theirs: fp32 beside a bf16 frozen base, fp64 where Lightning's
    `64-true` precision made the whole module double (the switch used to cast every adapter to fp32 there)."""
    def adapter_params(m):
        params = {**adapters.faceid_parameters(m.unet), **adapters.router_parameters(m.unet)}
        for name in adapters.lora_names(m.unet):
            params.update(adapters.lora_parameters(m.unet, name))
        return params

    bf16 = make_module(tiny_world, frozen_dtype="bfloat16")
    bf16.configure_stage(2)
    assert adapters.router_parameters(bf16.unet)
    assert {p.dtype for p in adapter_params(bf16).values()} == {torch.float32}

    m = make_module(tiny_world).double()
    before = {k: v.detach().clone() for k, v in adapter_params(m).items()}
    m.configure_stage(2)
    after = adapter_params(m)
    assert set(after) > set(before) and {p.dtype for p in after.values()} == {torch.float64}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in batch_from(tiny_world, multi=True).items()}
    out = m.shared_step(batch)  # the stage-2 forward runs in one dtype
    assert out["loss"].dtype == torch.float64 and torch.isfinite(out["loss"])


def test_stage1_untrained_adapter_is_the_base_model_and_training_reaches_every_part(tiny_world):
    """to_v_faceid starts at zero: the untrained model equals the base UNet exactly (own == other
    identity); after one optimizer step gradients reach the ID embedding and both projections."""
    m = make_module(tiny_world)
    m.train()
    batch = batch_from(tiny_world)
    g = torch.Generator().manual_seed(0)
    own, other = m.identity_gap(batch, generator=g)
    assert torch.equal(own, other)
    opt = m.configure_optimizers()
    out = m.shared_step(batch)
    assert set(out) == {"diffusion", "loss"}
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in adapters.faceid_parameters(m.unet).items() if "to_v_faceid" in n)
    opt.step()
    opt.zero_grad(set_to_none=True)
    m.shared_step(batch)["loss"].backward()
    emb_grads = [p.grad for p in m.identity.embedding.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in emb_grads)
    k_grads = [p.grad for n, p in adapters.faceid_parameters(m.unet).items() if "to_k_faceid" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in k_grads)


def test_identity_gap_skips_the_other_forward_only_when_the_face_id_branch_is_silent(tiny_world, monkeypatch):
    """Untrained (every to_v_faceid zero) the other identity's forward is not run: the figures equal those of
    running it, bit for bit, with half the UNet forwards. Once to_v_faceid moves, both forwards run and differ."""
    m = make_module(tiny_world).eval()
    batch = batch_from(tiny_world)
    forwards = []
    m.unet.register_forward_hook(lambda *_: forwards.append(1))

    def gap() -> tuple[torch.Tensor, torch.Tensor, int]:
        forwards.clear()
        own, other = m.identity_gap(batch, generator=torch.Generator().manual_seed(1), draws=2)
        return own, other, len(forwards)

    assert m.identity_path_silent()
    own, other, n = gap()
    assert n == 2 and torch.equal(own, other)
    with monkeypatch.context() as mp:
        mp.setattr(UniPortraitModule, "identity_path_silent", lambda self: False)
        own_run, other_run, n_run = gap()
    assert n_run == 4 and torch.equal(own_run, own) and torch.equal(other_run, other)
    with torch.no_grad():
        for name, p in adapters.faceid_parameters(m.unet).items():
            if name.endswith("to_v_faceid.weight"):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert not m.identity_path_silent()
    own2, other2, n2 = gap()
    assert n2 == 4 and not torch.equal(own2, other2)


def test_condition_dropout_uses_the_unconditional_branch(module, tiny_world):
    module.eval()
    batch = batch_from(tiny_world)
    valid = batch["face_valid"]
    keep = module.identity_tokens(batch["face_recog"], batch["face_clip"], valid)
    drop_all = module.identity_tokens(batch["face_recog"], batch["face_clip"], valid,
                                      drop=torch.ones(4, dtype=torch.bool))
    uncond = module.identity.uncond_tokens(1)
    assert not torch.allclose(keep, drop_all)
    # every dropped face gets exactly the unconditional tokens, whatever its image
    assert torch.allclose(drop_all[:, 0], uncond.expand(4, -1, -1), atol=1e-6)


def test_stage2_step_routes_and_leaves_id_embedding_bit_identical(tiny_world):
    m = make_module(tiny_world, stage=2, routing_lambda=0.1)
    before = {k: v.clone() for k, v in m.identity.embedding.state_dict().items()}
    opt = m.configure_optimizers()
    m.train()
    batch = batch_from(tiny_world, multi=True)
    assert int(batch["face_valid"].sum(1).max()) >= 2
    out = m.shared_step(batch)
    assert set(out) == {"diffusion", "routing", "loss"}
    assert out["routing"] > 0
    out["loss"].backward()
    router_grads = [p.grad for p in adapters.router_parameters(m.unet).values()]
    assert all(g is not None for g in router_grads)
    opt.step()
    after = m.identity.embedding.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_routing_maps_are_one_hot_over_valid_identities(tiny_world):
    m = make_module(tiny_world, stage=2)
    batch = batch_from(tiny_world, multi=True)
    out = m.routing_maps(batch, timesteps=100)
    assert len(out["hard"]) == len(adapters.faceid_processors(m.unet))
    for hard in out["hard"]:
        s = hard.sum(1)
        assert torch.all(s == 1)
        assert torch.all(hard[~batch["face_valid"]] == 0)


def test_probes_sharing_their_encoder_outputs_give_the_same_figures(tiny_world):
    """The probes run the frozen encoders once per batch (`probe_inputs`): identity_gap over several draws
    equals the mean of single draws under the same generator, and routing_maps with shared inputs equals
    routing_maps computing them itself, bit for bit; different draws give different losses."""
    m = make_module(tiny_world, stage=2).eval()  # as the probes run it (training mode samples Gumbel noise)
    with torch.no_grad():  # a trained-looking adapter: the untrained one gives own == other exactly
        for p in adapters.faceid_parameters(m.unet).values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = batch_from(tiny_world, multi=True)
    own3, other3 = m.identity_gap(batch, generator=torch.Generator().manual_seed(5), draws=3)
    g = torch.Generator().manual_seed(5)
    single = [m.identity_gap(batch, generator=g) for _ in range(3)]
    assert torch.equal(own3, torch.stack([s[0] for s in single]).mean(0))
    assert torch.equal(other3, torch.stack([s[1] for s in single]).mean(0))
    assert not torch.equal(single[0][0], single[1][0])  # each draw is new noise
    inputs = m.probe_inputs(batch)
    for t in (100, 700):
        shared, alone = m.routing_maps(batch, t, seed=3, inputs=inputs), m.routing_maps(batch, t, seed=3)
        assert shared["names"] == alone["names"]
        for a, b in zip(shared["probs"], alone["probs"]):
            assert torch.equal(a, b)


def test_checkpoint_holds_adapters_only_and_round_trips(tiny_world, tmp_path):
    m = make_module(tiny_world, stage=2)
    with torch.no_grad():
        for p in adapters.router_parameters(m.unet).values():
            p.add_(0.01)
    ckpt = {}
    m.on_save_checkpoint(ckpt)
    keys = set(ckpt["state_dict"])
    assert keys == set(m.adapter_state_dict())
    assert not any(k.startswith(("vae.", "text_encoder.", "identity.face.", "identity.clip.")) for k in keys)
    assert not any(".base_layer." in k for k in keys)
    path = tmp_path / "m.ckpt"
    torch.save(ckpt, path)
    fresh = make_module(tiny_world, init_from=str(path), stage=2)
    for k, v in fresh.adapter_state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k


def test_wrong_checkpoint_layout_is_a_clear_error(tiny_world, tmp_path):
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="not a UniPortrait checkpoint"):
        make_module(tiny_world, init_from=str(path))
    torch.save({"state_dict": {"foo": torch.zeros(1)}, "uniportrait": {"stage": 1}}, path)
    with pytest.raises(ValueError, match="does not match the model"):
        make_module(tiny_world, init_from=str(path))


def test_routing_report_pools_layers_and_breaks_them_down(tiny_world, capsys):
    """The end-of-stage-2 report: one group per split and face count, every routed layer listed,
    and the pooled accuracy a position-weighted mean of the layers' (so between their extremes); the
    figures printed are the figures written to the run's report.json."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from callbacks.routing_maps import RoutingAccuracyReport

    m = make_module(tiny_world, stage=2)
    heldout = tiny_world / "data" / "heldout"
    report = RoutingAccuracyReport(splits={"seen": str(heldout / "multi_seen-000000.tar"),
                                           "unseen": str(heldout / "multi_unseen-000000.tar")},
                                   max_batches=1, batch_size=8, band_samples=1)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=64), is_global_zero=True, logger=None,
                              global_step=0, default_root_dir=".")
    report.on_train_start(trainer, m)
    report.on_train_end(trainer, m)
    written = json.loads(Path("report.json").read_text())["routing_accuracy"]  # what src.guard reads
    assert written["after"] == report.after and written["before"] == report.before
    # the picture: one row group per split, columns image | true masks | before | after
    assert set(report.before_maps) == {"seen", "unseen"}
    maps = report.before_maps["seen"]  # (images, slots, H, W)
    assert maps.shape[0] == 4 and maps.shape[1] in (2, 3) and maps.shape[-2:] == (64, 64)
    from PIL import Image

    with Image.open("routing_maps.png") as picture:
        assert picture.width > 4 * 64 * 3 and picture.height > 2 * 4 * 64 * 3
    groups = set(report.after)
    assert groups and {g.split("/")[0] for g in groups} == {"seen", "unseen"}
    assert all(g.split("/")[1] in {"2faces", "3faces"} for g in groups)
    n_layers = len(adapters.faceid_processors(m.unet))
    for group, pooled in report.after.items():
        layers = report.after_layers[group]
        assert len(layers) == n_layers
        per_layer = [v["all"] for v in layers.values() if v["all"] == v["all"]]  # drop NaN (no face cell)
        assert min(per_layer) - 1e-6 <= pooled["all"] <= max(per_layer) + 1e-6
    out = capsys.readouterr().out
    assert "per layer (t<250/all bands)" in out and "@16x16" in out
    assert "[routing maps] routing_maps.png: image, true face masks, before training, after training" in out


def test_routing_report_reads_the_whole_split_without_max_batches(tiny_world):
    """max_batches=None reads every held-out image (the tiny stage-2 config's routing report), and a
    number stops after that many batches."""
    import json

    from callbacks.training_report import heldout_batches

    pattern = str(tiny_world / "data" / "heldout" / "multi_seen-000000.tar")
    total = json.loads((tiny_world / "data" / "manifest.json").read_text())["counts"]["multi_seen"]
    sizes = [b["face_valid"].shape[0] for b in heldout_batches(pattern, 64, 5, multi_id=True, max_batches=None)]
    assert sum(sizes) == total and len(sizes) == -(-total // 5)
    assert len(list(heldout_batches(pattern, 64, 5, multi_id=True, max_batches=2))) == 2


def test_feature_cache_skips_the_frozen_encoders_and_leaves_the_loss_unchanged(tiny_world):
    """With `feature_cache`, a face seen again is looked up by its digest instead of going through the
    face backbone and the CLIP tower; the losses equal those without the cache exactly (the first pass
    encodes the same batch, the second reads what it stored); the LRU bound holds; bad sizes fail."""
    batch = batch_from(tiny_world, multi=True)
    n_faces = int(batch["face_valid"].sum())
    plain, cached = make_module(tiny_world, stage=2), make_module(tiny_world, stage=2, feature_cache=100)
    rows = []
    cached.identity.face.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    for m in (plain, cached):
        m.train()
    for seed in (0, 1):
        torch.manual_seed(seed)
        want = plain.shared_step(batch)
        torch.manual_seed(seed)
        got = cached.shared_step(batch)
        for k in ("diffusion", "routing"):
            assert torch.equal(got[k], want[k]), k
    cache = cached.identity.cache
    assert sum(rows) == n_faces and (cache.hits, cache.misses, len(cache)) == (n_faces, n_faces, n_faces)
    assert cache.hit_rate() == 0.5
    cache.check_tag(torch.device("cpu"), torch.float64)  # the encoders changed dtype: stale entries go
    assert len(cache) == 0

    small = make_module(tiny_world, stage=2, feature_cache=2)
    small.shared_step(batch)
    assert len(small.identity.cache) == 2
    with pytest.raises(ValueError, match=r"model.feature_cache must be in \[0, inf\]"):
        make_module(tiny_world, feature_cache=-1)
