"""Checkpoint files: atomic saves survive a kill mid-write; code-executing pickles are refused everywhere."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.checkpoint_io import AtomicCheckpointIO
from tests.reliability.helpers import REPO, cli_env, fit_args

KILL_MID_SAVE = r"""
import os, signal, sys, torch
from src.checkpoint_io import AtomicCheckpointIO

class DiesMidWrite(AtomicCheckpointIO):
    def write(self, checkpoint, f):
        torch.save(checkpoint, f)
        size = f.tell()
        f.truncate(size // 2)  # half the bytes are on disk ...
        f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # ... when the process dies

path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
DiesMidWrite().save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
"""


def test_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path)], cwd=REPO, env=cli_env())
    assert proc.returncode == -9  # killed inside the second save
    stray = list(path.parent.glob(".last.ckpt.*.tmp"))
    assert len(stray) == 1 and 0 < stray[0].stat().st_size  # the half-written new checkpoint ...
    with pytest.raises(RuntimeError):  # PytorchStreamReader: truncated zip archive
        torch.load(stray[0], weights_only=True)  # ... is indeed unreadable
    ckpt = AtomicCheckpointIO().load_checkpoint(path)  # the previous one is intact under the real name
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)  # the next save replaces it, cleans up
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert not list(path.parent.glob(".last.ckpt.*.tmp"))


def test_a_failing_save_raises_and_keeps_the_previous_file(tmp_path):
    class Fails(AtomicCheckpointIO):
        def write(self, checkpoint, f):
            f.write(b"partial")
            raise OSError("disk full")

    path = tmp_path / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    with pytest.raises(OSError, match="disk full"):
        Fails().save_checkpoint({"global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


class _Evil:
    """Unpickling this creates `marker`: a stand-in for any code a malicious checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Evil(marker)}, "uniportrait": {"stage": 1}, "global_step": 1,
                "pytorch-lightning_version": "2.6.6"}, path)
    # the file really is dangerous: an unsafe load runs its payload (done in a throw-away process)
    probe = tmp_path / "probe.ckpt"
    probe.write_bytes(path.read_bytes())
    code = f"import torch; torch.load({str(probe)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env())
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_checkpoint_io_refuses_code_executing_pickles(evil_checkpoint, monkeypatch):
    path, marker = evil_checkpoint
    with pytest.raises(ValueError, match=f"refusing to load checkpoint '{path}'"):
        AtomicCheckpointIO().load_checkpoint(path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # flips torch.load's default, not ours
    with pytest.raises(ValueError, match="refusing"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(ValueError, match="weights_only=True only"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


def test_module_init_from_refuses_code_executing_pickles(evil_checkpoint, tiny_world):
    from tests.test_module import make_module

    path, marker = evil_checkpoint
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        make_module(tiny_world, init_from=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("plugin", [False, True], ids=["lightning-default", "AtomicCheckpointIO"])
def test_cli_resume_refuses_code_executing_pickles(evil_checkpoint, tiny_world, tmp_path, plugin):
    """`fit --ckpt_path=evil.ckpt`: Lightning 2.6.6 passes weights_only=None, i.e. torch's default (True
    since torch 2.6); our plugin passes True explicitly (robust to TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
    from src.cli.train import main

    path, marker = evil_checkpoint
    args = [*fit_args(tiny_world, tmp_path), "--trainer.max_steps=1", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing=false", f"--ckpt_path={path}"]
    if plugin:
        args.append('--trainer.plugins=[{"class_path": "src.checkpoint_io.AtomicCheckpointIO"}]')
    with pytest.raises(Exception, match="(?i)weights.only|refusing"):
        main(args)
    assert not marker.exists()


def test_every_torch_load_in_the_code_is_weights_only():
    """Static guard: each torch.load call in src/, datamodules/, callbacks/ passes weights_only=True."""
    offenders = []
    for root in ("src", "datamodules", "callbacks"):
        for file in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                        and getattr(node.func.value, "id", None) == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        offenders.append(f"{file.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"
