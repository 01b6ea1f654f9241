"""`uniportrait-bench-sd15` / `python -m src.bench_sd15`: the SD1.5- and SDXL-scale benchmark
(src/benchmarks/sd15.py; `--arch sdxl` for SDXL at 1024 px)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from src.benchmarks import sd15
from src.benchmarks.measure import Device, matmul_peak_tflops
from src.benchmarks.sd15 import ARCHS, build_nets, describe, inference_rows, markers, tables, training_rows
from src.benchmarks.steps import write_section
from src.cli import exit_status


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=sd15.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15",
                   help="sd15 / sdxl: the real architectures (CUDA); tiny / tiny-sdxl: their CPU stand-ins")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=None, help="default: 512 (sd15), 1024 (sdxl), 64 (tiny*)")
    p.add_argument("--iters", type=int, default=10, help="timed training steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=25, help="denoising steps at inference")
    p.add_argument("--infer-iters", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also measure the UniPortrait rows with torch.compile")
    p.add_argument("--big-batch", type=int, default=0,
                   help="also stage 1 at this batch with gradient checkpointing (e.g. 64; 0 = skip)")
    p.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args(argv)
    arch = ARCHS[a.arch]()
    a.resolution = a.resolution or arch.resolution
    dev = Device(torch.device(a.device))
    if not arch.name.startswith("tiny") and not dev.cuda:
        raise SystemExit(f"--arch {arch.name} needs a CUDA device (use --arch tiny or tiny-sdxl on the CPU)")
    torch.manual_seed(0)
    log = lambda msg: print(f"[bench_sd15] {msg}", flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        nets = build_nets(arch, Path(tmp) / "tokenizer")
    for m in (nets.vae, *nets.text_encoders, nets.clip, nets.face):
        m.to(dev.device)
    peak = matmul_peak_tflops(dev)
    log(f"matmul peak {peak:.1f} TFLOP/s")
    head = describe(dev, arch, a, peak)
    rows: dict[str, list[dict]] = {"train": [], "infer": []}

    def record(part: str, measured: list[dict]) -> None:
        """Write the tables so far after every row: a run stopped midway keeps what it measured."""
        rows[part] = measured
        if not a.no_record:
            command = "python -m src.bench_sd15" + (" --arch sdxl" if arch.sdxl else "")
            write_section(a.doc, *markers(arch), f"{head}\n\n{tables(rows['train'], rows['infer'])}",
                          f"{arch.label} scale (`{command}`)")

    training_rows(arch, nets, dev, a.batch_size, a.resolution, a.iters, a.warmup, peak, a.compile, log, a.big_batch,
                  on_row=lambda measured: record("train", measured))
    inference_rows(arch, nets, dev, a.steps, a.infer_iters, log, on_row=lambda measured: record("infer", measured))
    out = tables(rows["train"], rows["infer"])
    print(head + "\n\n" + out)
    if not a.no_record:
        print(f"recorded in {a.doc}")
    return out


def console() -> None:
    """Console script `uniportrait-bench-sd15`."""
    sys.exit(exit_status(main()))


if __name__ == "__main__":
    console()
