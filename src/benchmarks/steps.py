"""What every benchmark shares: one full training step of a module, timing it, and recording a table in a doc."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch


def optimizer_of(module) -> torch.optim.Optimizer:
    """The module's optimizer (`configure_optimizers` returns a dict when a scheduler is configured)."""
    opt = module.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


def module_step(module, batch, opt: torch.optim.Optimizer) -> Callable[[], None]:
    """One full training step of `module` on `batch` (forward, backward, optimizer step)."""
    def step() -> None:
        loss = module.shared_step(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(module, batch, steps: int, warmup: int = 2) -> float:
    """Seconds per full training step (forward, backward, optimizer step)."""
    step = module_step(module, batch, optimizer_of(module))
    module.train()
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def write_section(doc: Path, begin: str, end: str, body: str, heading: str) -> None:
    """Replace what lies between the `begin` / `end` markers of `doc` with `body` (or append a new
    `## heading` section with the markers); the rest of the file is kept as it is."""
    block = f"{begin}\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n"
    doc.write_text(text)
