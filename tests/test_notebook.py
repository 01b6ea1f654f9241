"""notebooks/routing_maps.ipynb runs end to end on the embedded default (a stage-2 checkpoint)."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from tests.test_module import make_module

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "routing_maps.ipynb"


@pytest.mark.slow
def test_routing_maps_notebook_executes(tiny_world, tmp_path, monkeypatch):
    module = make_module(tiny_world, stage=2)
    ckpt = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / "stage2.ckpt"
    torch.save(ckpt, path)
    monkeypatch.setenv("UNIPORTRAIT_CKPT", str(path))
    monkeypatch.setenv("UNIPORTRAIT_WORLD", str(tiny_world))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "routing_maps.png").stat().st_size > 0
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "routed layers" in printed and "stage 2" in printed
    assert os.environ["UNIPORTRAIT_CKPT"] == str(path)
