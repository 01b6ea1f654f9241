"""Column titles of the routing pictures (callbacks/routing_maps.py): the TensorBoard panel of RoutingMapLogger
and the PNG of save_routing_picture carry a light band with a dark title above every column, in column order."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from callbacks import routing_maps
from callbacks.routing_maps import GRID_PADDING, RoutingMapLogger, routing_panel, save_routing_picture

SIZE, SLOTS = 64, 2
NAMES = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
         "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
         "up_blocks.2.attentions.1.transformer_blocks.0.attn2.processor",
         "custom_block_with_a_very_long_name_that_cannot_fit_a_column.attn2.processor"]


def fake_batch(n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, SLOTS, SIZE, SIZE)
    masks[:, 0, 8:28, 8:28] = 1
    masks[:, 1, 30:56, 30:56] = 1
    return {"image": torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1, "face_masks": masks,
            "face_valid": torch.ones(n, SLOTS, dtype=torch.bool)}


class FakeModule:
    """The public surface RoutingMapLogger uses: stage, probe_inputs, routing_maps, transfer_batch_to_device, log."""

    stage = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, idx: int) -> dict[str, Any]:
        return batch

    def probe_inputs(self, batch: dict[str, Any]) -> None:
        return None

    def routing_maps(self, batch: dict[str, Any], t: int, seed: int = 0, inputs: Any = None) -> dict[str, Any]:
        g = torch.Generator().manual_seed(seed)
        b = batch["image"].shape[0]
        hard = [F.one_hot(torch.randint(SLOTS, (b, r, r), generator=g), SLOTS).permute(0, 3, 1, 2).float()
                for r in (16, 8, 16, 8)]  # (B, N, r, r) one-hot per layer
        return {"names": list(NAMES), "hard": hard, "probs": hard, "masks": batch["face_masks"],
                "valid": batch["face_valid"]}

    def log(self, name: str, value: float, **kwargs: Any) -> None:
        self.logged[name] = value


def assert_titled_band(band: np.ndarray, left: int, stride: int, column_width: int, columns: int) -> None:
    """band (h, W, 3) uint8: light overall, dark ink inside every column's span, none in the gaps between."""
    gray = band.astype(float).mean(-1)  # (h, W)
    assert (gray > 200).mean() > 0.8, "the title band is not a light background"
    for i in range(columns):
        x0 = left + i * stride
        assert (gray[:, x0 : x0 + column_width] < 100).sum() >= 10, f"no dark title text above column {i}"
        if i:
            gap = gray[:, x0 - (stride - column_width) : x0]
            assert gap.min() > 200, f"title ink spills into the gap before column {i}"


def test_tensorboard_panel_has_titles_input_masks_then_layers_in_order(monkeypatch):
    """The logged routing/maps image is the plain panel under a title band; the titles are "input",
    "true masks" and the short names of the chosen layers in the `layers` order, one per column."""
    seen: list[list[str]] = []

    def spy(*args: Any, titles: list[str] | None = None) -> torch.Tensor:
        seen.append(titles)
        return routing_panel(*args, titles=titles)

    monkeypatch.setattr(routing_maps, "routing_panel", spy)
    images: list[tuple[str, torch.Tensor]] = []
    exp = SimpleNamespace(add_image=lambda tag, img, global_step: images.append((tag, img)))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, logger=SimpleNamespace(experiment=exp),
                              datamodule=SimpleNamespace(val_shards="unused"))
    batch, module = fake_batch(), FakeModule()
    cb = RoutingMapLogger(every_n_steps=1, layers=[2, 0, 3], num_images=3, band_samples=1)
    cb._batch = batch
    cb.on_train_batch_end(trainer, module, None, None, 0)

    assert seen == [["input", "true masks", "up2.1", "down1.0", NAMES[3]]]
    (tag, logged), = images
    assert tag == "routing/maps" and "routing/acc_all" in module.logged
    out = module.routing_maps(batch, 0)
    plain = routing_panel(batch["image"], [out["hard"][i] for i in (2, 0, 3)], batch["face_masks"],
                          batch["face_valid"])  # (3, H', W') without titles
    band = logged.shape[1] - plain.shape[1]
    assert logged.shape[0] == 3 and logged.shape[2] == plain.shape[2] and band >= 10
    assert torch.allclose(logged[:, band:], plain, atol=1 / 255 + 1e-6)  # the panel itself is untouched
    stride = SIZE + GRID_PADDING
    arr = (logged[:, :band] * 255).round().byte().permute(1, 2, 0).numpy()
    assert_titled_band(arr, GRID_PADDING, stride, SIZE, 5)


def test_titles_must_match_the_columns():
    batch = fake_batch(1)
    hard = FakeModule().routing_maps(batch, 0)["hard"][:2]
    with pytest.raises(ValueError, match="3 titles .* for 4 columns"):
        routing_panel(batch["image"], hard, batch["face_masks"], batch["face_valid"], titles=["a", "b", "c"])


def test_saved_picture_has_a_title_band_above_its_columns(tmp_path: Path):
    from PIL import Image

    batch = fake_batch(2)
    hard = FakeModule().routing_maps(batch, 0)["hard"][:2]
    panel = routing_panel(batch["image"], hard, batch["face_masks"], batch["face_valid"])  # (3, H', W')
    scale, label_w, gap = 3, 90, 6  # save_routing_picture's layout
    columns = ["image", "true face masks", "before training", "after training"]
    path = save_routing_picture(tmp_path / "maps.png", {"seen": panel, "unseen": panel}, columns, scale=scale)
    with Image.open(path) as picture:
        arr = np.asarray(picture.convert("RGB"))
    header = arr.shape[0] - 2 * (panel.shape[1] * scale + gap)
    assert header >= 10 and arr.shape[1] == label_w + panel.shape[2] * scale
    assert_titled_band(arr[:header, label_w:], GRID_PADDING * scale, (SIZE + GRID_PADDING) * scale, SIZE * scale,
                       len(columns))


def test_the_metric_callbacks_measure_once_per_optimizer_step_under_gradient_accumulation(monkeypatch) -> None:
    """With `accumulate_grad_batches: 4`, `on_train_batch_end` sees each global step four times: the routing maps
    and the identity metrics are measured once per interval, not four times."""
    from callbacks.id_metrics import IdentityMetrics

    calls: list[str] = []
    logger = RoutingMapLogger(every_n_steps=2)
    monkeypatch.setattr(logger, "_fixed_batch", lambda trainer, module: calls.append("routing"))
    metrics = IdentityMetrics(every_n_steps=2)
    monkeypatch.setattr(metrics, "fixed_batch", lambda trainer: calls.append("identity"))
    module = SimpleNamespace(stage=2)
    for step in (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2):
        trainer = SimpleNamespace(global_step=step, is_global_zero=True)
        logger.on_train_batch_end(trainer, module, None, None, 0)
        metrics.on_train_batch_end(trainer, module, None, None, 0)
    assert calls == ["routing", "identity"] * 2  # steps 0 and 2
