"""How the SD1.5-scale benchmark measures (src/benchmarks/sd15.py): the device (sync, autocast, peak memory),
timing, the matmul peak MFU is measured against, row isolation, and FLOPs counted honestly: the trainable
network's forward + backward (gradient checkpointing's recomputation excluded) apart from the frozen encoders.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


class Device:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.amp = torch.bfloat16 if self.cuda else None  # CPU: fp32 (what the tiny test checks)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp) if self.amp else contextlib.nullcontext()

    def reset_memory(self) -> None:
        if self.cuda:  # on the CPU there is nothing to reset: the peak is the process's (ru_maxrss)
            gc.collect()  # frees the last row's tensors before the cache is emptied
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 1024**3
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    def timed(self, fn: Callable[[], Any], iters: int, warmup: int) -> float:
        """Seconds per call of `fn` after `warmup` calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / iters


def matmul_peak_tflops(dev: Device, min_seconds: float = 1.0) -> float:
    """Measured dense matmul throughput: bf16 8192^3 on a GPU, fp32 1024^3 on the CPU, timed over at least
    `min_seconds` (a few calls of ~1 ms on a GPU would time the clock ramp and the launch, not the peak)."""
    n, dtype = (8192, torch.bfloat16) if dev.cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=dev.device, dtype=dtype)
    b = torch.randn(n, n, device=dev.device, dtype=dtype)
    first = dev.timed(lambda: a @ b, iters=3, warmup=3 if dev.cuda else 1)
    iters = max(3, math.ceil(min_seconds / max(first, 1e-6)))
    sec = dev.timed(lambda: a @ b, iters=iters, warmup=0)
    return 2 * n**3 / sec / 1e12


@contextlib.contextmanager
def isolated(name: str, rows: list[dict], log: Callable[[str], None], dev: Device,
             on_row: Callable[[list[dict]], None]) -> Iterator[None]:
    """One row: an exception inside (out of memory, a compile error, ...) is recorded as the row's result and
    the benchmark goes on (KeyboardInterrupt and SystemExit are not caught); `on_row(rows)` after it."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 (any failure of one row is that row's figure)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        rows.append({"row": name, "error": f"{type(err).__name__}: {first[:160]}"})
        log(f"{name}: failed, {rows[-1]['error']}")
    finally:
        dev.reset_memory()
        on_row(rows)


def count_flops(fn: Callable[[], Any]) -> float:
    """Every FLOP `fn` runs (`torch.utils.flop_counter`: matmuls, convolutions, attention), backward included.
    A recomputed forward (gradient checkpointing) is counted again: see `model_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


@contextlib.contextmanager
def no_recompute(unet: torch.nn.Module) -> Iterator[None]:
    """Gradient checkpointing off inside (diffusers' switch), back on after: the FLOPs counted inside are the
    model's, not the hardware's (recomputing the forward in the backward pass is extra work, not model FLOPs)."""
    was = bool(getattr(unet, "is_gradient_checkpointing", False))
    if was:
        unet.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if was:
            unet.enable_gradient_checkpointing()


def frozen_flops(module, batch: dict[str, Any]) -> float:
    """FLOPs of the frozen encoders' forward on `batch`, as a training step runs them: VAE encoder, text
    encoder, IR-101 and CLIP tower on every valid face. Shown apart from the model FLOPs: they have no
    backward, and precomputed latents and cached features remove them from the step."""
    valid = batch["face_valid"].flatten()  # (B*N,)

    def encoders() -> None:
        with torch.no_grad():
            module.encode_images(batch["image"])
            module.encode_text(batch["caption"])
            module.identity.features(batch["face_recog"].flatten(0, 1)[valid][:, None],
                                     batch["face_clip"].flatten(0, 1)[valid][:, None])

    return count_flops(encoders)


def model_flops(step: Callable[[], None], unet: torch.nn.Module | None, frozen: float) -> float:
    """The trainable network's forward + backward FLOPs of one `step` (what MFU is measured with): everything
    the step runs, gradient checkpointing's recomputation excluded, minus the frozen encoders' forward."""
    with no_recompute(unet) if unet is not None else contextlib.nullcontext():
        return count_flops(step) - frozen
