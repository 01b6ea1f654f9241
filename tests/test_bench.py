"""`make bench` (src/cli/bench.py, src/benchmarks/) on the tiny world: both stages, encoded and cached latents,
cached encoder features, doc section rewritten."""
from __future__ import annotations

import pytest
import torch

from src.benchmarks import measure, sd15, tiny_cpu
from src.cli import bench, bench_sd15


def test_bench_measures_both_stages_and_rewrites_only_its_section(tiny_world, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nbefore\n\n{tiny_cpu.BEGIN}\nold table\n{tiny_cpu.END}\n\nafter\n")
    bench.main(["--world", str(tiny_world), "--batch-size", "2", "--steps", "1", "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old table" not in text and text.count(tiny_cpu.BEGIN) == 1
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [tuple(c.strip() for c in r.split("|")[1:4]) for r in rows] == [
        (stage, latents, features) for stage in ("1", "2")
        for latents, features in (("encoded", "computed"), ("cached", "computed"), ("cached", "cached"))]
    assert all(float(r.split("|")[7]) > 0 for r in rows)  # samples/s measured
    assert "recorded in" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny", "tiny-sdxl"])
def test_the_gpu_bench_code_runs_on_the_tiny_architectures(arch, tmp_path, capsys):
    """The GPU benchmark's code path (random weights, baseline loop, both stages, UNet part, a
    checkpointed big batch, inference with 0/1/2 identities) on the tiny architectures on the CPU: the SD1.5
    one, and the tiny SDXL world's (two text encoders, pooled text and time_ids) into its own section."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    bench_sd15.main(["--arch", arch, "--batch-size", "2", "--iters", "1", "--warmup", "0", "--steps", "2",
                     "--infer-iters", "1", "--big-batch", "3", "--doc", str(doc)])
    text = doc.read_text()
    sdxl = arch == "tiny-sdxl"
    begin, _ = sd15.markers(sd15.ARCHS[arch]())
    assert text.count(begin) == 1 and f"Architecture `{arch}`" in text
    assert (sd15.BEGIN in text) != sdxl and ("SDXL scale" in text) == sdxl
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for name in ("baseline LoRA loop", "stage 1", "stage 1, UNet part", "stage 2", "stage 1, gradient checkpointing",
                 f"plain {'SDXL' if sdxl else 'SD1.5'} pipeline", "UniPortrait, 0 identities",
                 "UniPortrait, 1 identity", "UniPortrait, 2 identities"):
        assert name in rows, name
    assert not any("failed" in line for line in rows.values())
    cell = lambda name, i: rows[name].split("|")[i].strip()  # noqa: E731
    assert cell("baseline LoRA loop", 5) == "1.00"  # x baseline of itself
    assert cell("stage 1, gradient checkpointing", 3) == "3"
    assert float(cell("stage 2", 6)) > float(cell("stage 1", 6))  # model TFLOP/img: router, 2-3 IDs
    assert float(cell("stage 1, UNet part", 6)) < float(cell("stage 1", 6))  # no Q-Former in the UNet part
    assert float(cell("stage 1", 8)) > 0 and float(cell("baseline LoRA loop", 8)) > 0  # frozen encoders apart
    assert float(cell("stage 1, UNet part", 8)) == 0  # precomputed: nothing frozen left in the step
    assert cell("stage 1, gradient checkpointing", 6) == cell("stage 1", 6)  # the same model FLOPs per image
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench_sd15.main(["--arch", "sdxl" if sdxl else "sd15"])


def test_the_sdxl_preset_is_sdxl_base_shaped():
    """The SDXL rows' random networks have SDXL base 1.0's shapes (checked on the configs, without building
    the 2.6B-parameter UNet): 2048-wide cross-attention from 768 + 1280 text states, "text_time" conditioning
    of 6 x 256 time ids + the 1280 pooled embedding, 1024 px."""
    a = sd15.SDXL
    assert a.sdxl and a.resolution == 1024 and a.label == "SDXL"
    assert a.text["hidden_size"] + a.text_2["hidden_size"] == a.unet["cross_attention_dim"] == 2048
    assert a.unet["projection_class_embeddings_input_dim"] == 6 * a.unet["addition_time_embed_dim"] + \
        a.text_2["projection_dim"]
    assert a.unet["sample_size"] * 8 == a.vae["sample_size"] == a.resolution
    assert not sd15.SD15.sdxl and sd15.markers(sd15.SD15) == (sd15.BEGIN, sd15.END)


TINY_RUN = ["--arch", "tiny", "--batch-size", "2", "--iters", "1", "--warmup", "0", "--steps", "2",
            "--infer-iters", "1"]


def _rows(doc) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in doc.read_text().splitlines() if line.startswith("| ")}


def _measured(line: str) -> float:
    """A row's speed: img/s of a training row (4th of 9 columns), ms / image of an inference row (2nd)."""
    cells = [c.strip() for c in line.split("|")[1:-1]]
    return float(cells[3] if len(cells) == 9 else cells[1])


def test_a_failing_row_is_recorded_as_its_result_and_the_other_rows_go_on(tmp_path, monkeypatch):
    """An out-of-memory error in stage 2's step is that row's figure; the other rows are still measured."""
    from src.benchmarks import steps

    def step_or_oom(module, batch, opt):
        if module.stage == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
        return steps.module_step(module, batch, opt)

    monkeypatch.setattr(sd15, "module_step", step_or_oom)
    doc = tmp_path / "benchmarks.md"
    bench_sd15.main([*TINY_RUN, "--doc", str(doc)])
    rows = _rows(doc)
    assert "failed: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB |" in rows["stage 2"]
    for name in ("baseline LoRA loop", "stage 1", "stage 1, UNet part", "plain SD1.5 pipeline",
                 "UniPortrait, 2 identities"):
        assert "failed" not in rows[name] and _measured(rows[name]) > 0, name


def test_a_run_stopped_midway_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # not a row's error: the run stops here

    monkeypatch.setattr(sd15, "unet_part_step", interrupted)
    doc = tmp_path / "benchmarks.md"
    with pytest.raises(KeyboardInterrupt):
        bench_sd15.main([*TINY_RUN, "--doc", str(doc)])
    rows = _rows(doc)
    assert _measured(rows["baseline LoRA loop"]) > 0 and _measured(rows["stage 1"]) > 0
    assert "stage 2" not in rows and "plain SD1.5 pipeline" not in rows


def test_model_flops_exclude_recompute_and_the_frozen_encoders():
    """MFU's FLOPs: with gradient checkpointing the step runs the UNet's forward again (FlopCounterMode counts it),
    which `model_flops` leaves out; the frozen encoders' forward is counted apart and adds up to the whole step."""
    from src.benchmarks.steps import module_step, optimizer_of

    arch = sd15.tiny_arch()
    nets = sd15.build_nets(arch, _tmp_tokenizer())
    batch = sd15.random_batch(arch, nets, 2, 64, [1, 1], torch.device("cpu"), seed=0)
    counts = {}
    for checkpointing in (False, True):
        module = sd15.make_module(arch, nets, 1, False, torch.device("cpu"), gradient_checkpointing=checkpointing)
        module.train()
        step = module_step(module, batch, optimizer_of(module))
        frozen = measure.frozen_flops(module, batch)
        counts[checkpointing] = (measure.count_flops(step), measure.model_flops(step, module.unet, frozen), frozen)
        assert module.unet.is_gradient_checkpointing == checkpointing  # switched back on after counting
    (plain_all, plain_model, frozen), (ckpt_all, ckpt_model, _) = counts[False], counts[True]
    assert frozen > 0 and plain_model > 0
    assert plain_model + frozen == plain_all  # nothing recomputed without checkpointing
    assert ckpt_all > 1.2 * plain_all  # the recomputed forward is counted by the counter ...
    assert ckpt_model == plain_model  # ... and not by model_flops


def _tmp_tokenizer():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "tokenizer"


def test_fast_module_settings_run_a_step_with_bf16_frozen_weights_and_fused_adamw():
    """The GPU rows' settings (`make_module(fast=True)`: frozen weights in bf16, fused AdamW) on the CPU: the shared
    frozen encoders are cast, the trained parameters stay fp32 and one optimizer step moves them."""
    from src.benchmarks.steps import module_step, optimizer_of

    arch = sd15.tiny_arch()
    nets = sd15.build_nets(arch, _tmp_tokenizer())
    module = sd15.make_module(arch, nets, 1, False, torch.device("cpu"), fast=True)
    module.train()
    opt = optimizer_of(module)
    assert all(g["fused"] for g in opt.param_groups)
    assert nets.vae.dtype == torch.bfloat16 and module.unet.conv_in.weight.dtype == torch.bfloat16
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    batch = sd15.random_batch(arch, nets, 2, 64, [1, 1], torch.device("cpu"), seed=0)
    module_step(module, batch, opt)()
    moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])]
    assert moved and all(dict(module.named_parameters())[n].dtype == torch.float32 for n in moved)
