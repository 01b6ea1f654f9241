"""Routing maps and routing accuracy in TensorBoard, from the module's public `routing_maps()`."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

from callbacks.training_report import heldout_batches, report_path, write_report
from src.conventions import IDENTITY_COLOURS
from src.metrics import RANK_LOCAL, RoutingAccuracy

log = logging.getLogger(__name__)

PALETTE = torch.tensor(IDENTITY_COLOURS) / 255.0  # (16, 3) RGB in [0, 1], slot n -> PALETTE[n % 16]
GRID_PADDING = 2  # pixels between the tiles of a routing_panel grid (white)
MIN_TITLE_PX, MAX_TITLE_PX = 10, 32  # font size range of the column titles
BANDS = {"t<250": (0, 250), "250-500": (250, 500), "500-750": (500, 750), "t>=750": (750, 1000)}


def colourise(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, h, w) routing weights (or masks) -> (B, 3, H, W) colour image, one colour per identity."""
    maps = F.interpolate(maps.float(), size=size, mode="nearest")
    pal = PALETTE[torch.arange(maps.shape[1]) % len(PALETTE)].to(maps)  # (N, 3)
    return torch.einsum("bnhw,nc->bchw", maps, pal).clamp(0, 1)


def routing_panel(image: torch.Tensor, hard: list[torch.Tensor], masks: torch.Tensor,
                  valid: torch.Tensor, titles: list[str] | None = None) -> torch.Tensor:
    """One row per image: the image, its face masks, then the routing map of each chosen layer
    (each blended 50/50 over the image). image (B,3,H,W) in [-1,1]; returns a (3, H', W') grid.

    titles: one per column (2 + len(hard)); given, they are drawn in a light band above the grid
    (`with_column_titles`), so the picture reads on its own wherever it is shown (TensorBoard has no
    other place for column labels)."""
    size = tuple(image.shape[-2:])
    base = (image.float().cpu() + 1) / 2
    m = masks.float().cpu() * valid.float().cpu()[..., None, None]
    tiles = [base, 0.5 * base + 0.5 * colourise(m, size)]
    tiles += [0.5 * base + 0.5 * colourise(h.float().cpu() * valid.float().cpu()[..., None, None], size) for h in hard]
    rows = torch.stack(tiles, dim=1).flatten(0, 1)  # (B * (2 + L), 3, H, W)
    grid = make_grid(rows, nrow=len(tiles), padding=GRID_PADDING, pad_value=1.0)
    if titles is None:
        return grid
    if len(titles) != len(tiles):
        raise ValueError(f"routing_panel: {len(titles)} titles {titles} for {len(tiles)} columns "
                         f"(image, masks and {len(hard)} routed layers)")
    return with_column_titles(grid, titles)


def title_font(column_width: int, titles: list[str]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font (no font files needed) at a size that grows with the column width
    (a sixth of it, 10..32 px) and shrinks until the widest title fits its column."""
    size = max(MIN_TITLE_PX, min(MAX_TITLE_PX, column_width // 6))
    while True:
        font = ImageFont.load_default(size=size)
        if size <= MIN_TITLE_PX or max(font.getlength(t) for t in titles) <= column_width - 4:
            return font
        size -= 1


def fit_title(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, title: str, width: int) -> str:
    """`title`, cut (ending in '..') to at most `width` pixels in `font`."""
    if font.getlength(title) <= width:
        return title
    while title and font.getlength(title + "..") > width:
        title = title[:-1]
    return title + ".."


def draw_column_titles(canvas: Image.Image, titles: list[str], left: int, stride: int, column_width: int,
                       band: int) -> None:
    """Draw `titles` in black, each centred above its column (column i spans left + i * stride ..
    + column_width) in the band of `band` pixels at the top of `canvas` (which is white there)."""
    font = title_font(column_width, titles)
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        text = fit_title(font, title, column_width - 4)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        x = left + i * stride + (column_width - (x0 + x1)) / 2  # centred (no `anchor`: bitmap fonts lack it)
        draw.text((x, (band - (y0 + y1)) / 2), text, fill=(0, 0, 0), font=font)


def title_band_height(column_width: int, titles: list[str]) -> int:
    """Pixels of the title band above columns of `column_width`: the font's height and a margin."""
    font = title_font(column_width, titles)
    top, bottom = font.getbbox("Ahgy.")[1::2]
    return int(bottom - top) + 8


def with_column_titles(grid: torch.Tensor, titles: list[str], padding: int = GRID_PADDING) -> torch.Tensor:
    """(3, H, W) make_grid picture in [0, 1] of len(titles) equal columns (separated by `padding`) ->
    (3, band + H, W): a white band on top with each column's title centred above it in black."""
    width = grid.shape[-1]
    stride = (width - padding) // len(titles)  # tile width + padding
    band = title_band_height(stride - padding, titles)
    canvas = Image.new("RGB", (width, band + grid.shape[-2]), "white")
    canvas.paste(Image.fromarray(to_uint8_hwc(grid)), (0, band))
    draw_column_titles(canvas, titles, padding, stride, stride - padding, band)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255  # (3, band + H, W)


def to_uint8_hwc(grid: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def pooled_routing(hard: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean over the routed layers of their one-hot maps [(B, N, h_l, w_l)], each upsampled to `size`:
    (B, N, H, W), the share of layers that route each position to each identity."""
    return torch.stack([F.interpolate(h.float().cpu(), size=size, mode="nearest") for h in hard]).mean(0)


def save_routing_picture(path: Path, rows: dict[str, torch.Tensor], columns: list[str], scale: int = 3) -> Path:
    """Write a PNG of labelled panels: one `routing_panel` grid (3, H', W') per named row group, stacked,
    upscaled `scale` times (nearest), with the column titles above (`draw_column_titles`, as in the
    TensorBoard panel) and each group's name at its left."""
    panels = [(name, to_uint8_hwc(grid)) for name, grid in rows.items()]
    width = max(a.shape[1] for _, a in panels) * scale
    stride = (width - GRID_PADDING * scale) // len(columns)  # tile width + padding, upscaled
    column_width = stride - GRID_PADDING * scale
    label_w, gap = 90, 6
    header_h = title_band_height(column_width, columns)
    height = header_h + sum(a.shape[0] * scale + gap for _, a in panels)
    canvas = Image.new("RGB", (label_w + width, height), "white")
    draw_column_titles(canvas, columns, label_w + GRID_PADDING * scale, stride, column_width, header_h)
    draw = ImageDraw.Draw(canvas)
    label_font = ImageFont.load_default(size=max(MIN_TITLE_PX, min(MAX_TITLE_PX, label_w // 5)))
    y = header_h
    for name, a in panels:
        img = Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
        canvas.paste(img, (label_w, y))
        draw.text((4, y + 4), fit_title(label_font, name, label_w - 8), fill="black", font=label_font)
        y += img.height + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def short_layer_name(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor' -> 'down1.0' (mid: 'mid.0')."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)", name)
    if m:
        return f"{m[1]}{m[2]}.{m[3]}"
    m = re.match(r"mid_block\.attentions\.(\d+)", name)
    return f"mid.{m[1]}" if m else name


class RoutingMapLogger(L.Callback):
    """Every `every_n_steps` (stage 2), on a fixed batch (of `data.val_shards`, else of the training shards:
    `FaceShardDataModule.preview_batch`): logs routing maps of the chosen
    layers next to the target face masks, and routing accuracy (share of face positions routed to the
    identity whose mask covers them) overall and per timestep band.

    layers: indices into the module's routed layers (None = all); num_images: rows in the panel.
    The panel (`routing/maps`) carries its column titles: "input", "true masks", then each shown layer's
    `short_layer_name`.
    """

    def __init__(self, every_n_steps: int = 500, layers: list[int] | None = None, num_images: int = 4,
                 band_samples: int = 2, seed: int = 0) -> None:
        self.every_n_steps, self.layers, self.num_images = every_n_steps, layers, num_images
        self.band_samples, self.seed = band_samples, seed
        self._batch: dict[str, Any] | None = None
        self._measured_at: int | None = None

    def _fixed_batch(self, trainer, pl_module) -> dict[str, Any] | None:
        if self._batch is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "preview_batch"):
                return None
            self._batch = dm.preview_batch()  # of val_shards, else of the training shards
            if self._batch is None:
                return None
        return pl_module.transfer_batch_to_device(self._batch, pl_module.device, 0)

    def evaluate(self, pl_module, batch) -> tuple[dict[str, float], dict[str, Any]]:
        metric = RoutingAccuracy(**RANK_LOCAL)
        g = torch.Generator().manual_seed(self.seed)
        mid = None
        inputs = pl_module.probe_inputs(batch)  # shared by every forward below
        for lo, hi in BANDS.values():
            for k in range(self.band_samples):
                t = int(torch.randint(lo, hi, (1,), generator=g))
                out = pl_module.routing_maps(batch, t, seed=self.seed + k, inputs=inputs)
                if not out["hard"]:
                    return {}, out
                for hard in out["hard"]:
                    metric.update(hard.cpu(), out["masks"].cpu(), out["valid"].cpu(),
                                  torch.full((hard.shape[0],), t))
                if lo == 0 and k == 0:
                    mid = out
        return {k: float(v) for k, v in metric.compute().items()}, mid

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.stage != 2 or trainer.global_step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        if trainer.global_step == self._measured_at:  # accumulated batches of one optimizer step: once
            return
        self._measured_at = trainer.global_step
        fixed = self._fixed_batch(trainer, pl_module)
        if fixed is None:
            return
        acc, out = self.evaluate(pl_module, fixed)
        for band, value in acc.items():
            pl_module.log(f"routing/acc_{band}", value, rank_zero_only=True)
        exp = getattr(trainer.logger, "experiment", None)
        if out and out["hard"] and hasattr(exp, "add_image"):
            idx = range(len(out["hard"])) if self.layers is None else self.layers
            titles = ["input", "true masks"] + [short_layer_name(out["names"][i]) for i in idx]
            n = self.num_images
            panel = routing_panel(fixed["image"][:n], [out["hard"][i][:n] for i in idx], out["masks"][:n],
                                  out["valid"][:n], titles=titles)
            exp.add_image("routing/maps", panel, global_step=trainer.global_step)


class RoutingAccuracyReport(L.Callback):
    """Before and after training: routing accuracy on held-out multi-face shards, per timestep band,
    split by the number of faces (2, 3, ...), for each named split (e.g. seen / unseen identities).
    Printed at the end of training (every band side by side), logged as
    `routing_report/<split>/<n>faces/<band>` and written to the run's `report.json` (section
    "routing_accuracy", `callbacks.training_report.write_report`). After
    training it also prints each routed layer's accuracy (name and resolution) in the t<250 band and
    over all bands, which shows whether the pooled number is lost in some layers more than others;
    kept in `self.after_layers` as {group: {layer: {band: acc}}}.

    It also writes `routing_maps.png` beside the report: for the first `picture_images` images of each
    split, the image, its true face masks, and the routing before and after training at t =
    `picture_t` (one colour per identity, the routed layers pooled), so the learning can be seen.

    splits: name -> shard pattern. max_batches: batches per split (None: the whole split).
    band_samples: timesteps per band (each a separate forward of every batch).
    measure_before: False skips the "before" figures and maps (`python -m src.guard control` sets it: the
        control starts from the same checkpoint and seed as stage 2, so its "before" is stage 2's).
    """

    def __init__(self, splits: dict[str, str], max_batches: int | None = 4, batch_size: int = 16,
                 band_samples: int = 2, seed: int = 0, picture_images: int = 4, picture_t: int = 100,
                 measure_before: bool = True) -> None:
        self.splits, self.max_batches, self.batch_size = splits, max_batches, batch_size
        self.measure_before = measure_before
        self.band_samples, self.seed = band_samples, seed
        self.picture_images, self.picture_t = picture_images, picture_t
        self.before: dict[str, dict[str, float]] | None = None
        self.before_maps: dict[str, torch.Tensor] | None = None
        self.after_layers: dict[str, dict[str, dict[str, float]]] = {}

    def picture_batches(self, trainer, pl_module) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        """{split: (its first `picture_images` held-out images as a batch, pooled routing (k, N, H, W) at
        t = picture_t)}."""
        resolution = getattr(trainer.datamodule, "resolution", 64)
        out = {}
        for name, pattern in self.splits.items():
            batch = next(heldout_batches(pattern, resolution, self.picture_images, multi_id=True, seed=self.seed), None)
            if batch is None:
                continue
            routed = pl_module.routing_maps(pl_module.transfer_batch_to_device(batch, pl_module.device, 0),
                                            self.picture_t, seed=self.seed)
            if routed["hard"]:
                out[name] = (batch, pooled_routing(routed["hard"], tuple(batch["image"].shape[-2:])))
        return out

    def write_picture(self, trainer, after: dict[str, tuple[dict[str, Any], torch.Tensor]]) -> Path | None:
        """routing_maps.png beside the run's report.json: image | true masks | before | after, per split."""
        if not after:
            return None
        before = self.before_maps or {}
        with_before = all(k in before and before[k].shape == maps.shape for k, (_, maps) in after.items())
        rows = {name: routing_panel(batch["image"], [before[name], maps] if with_before else [maps],
                                    batch["face_masks"], batch["face_valid"])
                for name, (batch, maps) in after.items()}
        columns = ["image", "true face masks"] + (["before training"] if with_before else []) + ["after training"]
        path = save_routing_picture(report_path(trainer).parent / "routing_maps.png", rows, columns)
        print(f"[routing maps] {path}: {', '.join(columns)} (t={self.picture_t}, routed layers pooled)", flush=True)
        return path

    def measure(self, trainer, pl_module) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
        """({"<split>/<n>faces": {band: acc}} pooled over layers, {group: {layer: {band: acc}}})."""
        resolution = getattr(trainer.datamodule, "resolution", 64)
        results: dict[str, dict[str, float]] = {}
        layers: dict[str, dict[str, dict[str, float]]] = {}
        g = torch.Generator().manual_seed(self.seed)
        for name, pattern in self.splits.items():
            metrics: dict[int, RoutingAccuracy] = {}
            per_layer: dict[tuple[int, str], RoutingAccuracy] = {}
            for batch in heldout_batches(pattern, resolution, self.batch_size, multi_id=True, seed=self.seed,
                                         max_batches=self.max_batches):
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                n_faces = batch["face_valid"].sum(1).cpu()
                inputs = pl_module.probe_inputs(batch)  # shared by the batch's len(BANDS) * band_samples forwards
                for lo, hi in BANDS.values():
                    for k in range(self.band_samples):
                        t = int(torch.randint(lo, hi, (1,), generator=g))
                        out = pl_module.routing_maps(batch, t, seed=self.seed + k, inputs=inputs)
                        for n in n_faces.unique().tolist():
                            sel = n_faces == n
                            m = metrics.setdefault(int(n), RoutingAccuracy(**RANK_LOCAL))
                            for layer, hard in zip(out["names"], out["hard"]):
                                args = (hard.cpu()[sel], out["masks"].cpu()[sel], out["valid"].cpu()[sel],
                                        torch.full((int(sel.sum()),), t))
                                m.update(*args)
                                key = (int(n), f"{short_layer_name(layer)}@{hard.shape[-2]}x{hard.shape[-1]}")
                                per_layer.setdefault(key, RoutingAccuracy(**RANK_LOCAL)).update(*args)
            for n, m in sorted(metrics.items()):
                results[f"{name}/{n}faces"] = {k: float(v) for k, v in m.compute().items()}
            for (n, layer), m in per_layer.items():
                group = layers.setdefault(f"{name}/{n}faces", {})
                group[layer] = {k: float(v) for k, v in m.compute().items()}
        return results, layers

    def on_train_start(self, trainer, pl_module) -> None:
        if self.before is None and pl_module.stage == 2 and self.measure_before:
            self.before, _ = self.measure(trainer, pl_module)
            if self.picture_images:
                self.before_maps = {k: maps for k, (_, maps) in self.picture_batches(trainer, pl_module).items()}

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.stage != 2 or not trainer.is_global_zero:
            return
        after, self.after_layers = self.measure(trainer, pl_module)
        for when, res in (("before", self.before), ("after", after)):
            for group, bands in (res or {}).items():
                cells = "  ".join(f"{b}: {v:.3f}" for b, v in bands.items())
                print(f"[routing accuracy] {when} {group}: {cells}", flush=True)
        for group, layers in sorted(self.after_layers.items()):
            cells = "  ".join(f"{layer}: {v['t<250']:.3f}/{v['all']:.3f}" for layer, v in layers.items())
            print(f"[routing accuracy] after {group}, per layer (t<250/all bands): {cells}", flush=True)
        exp = getattr(trainer.logger, "experiment", None)
        if hasattr(exp, "add_scalar"):
            for group, bands in after.items():
                for b, v in bands.items():
                    exp.add_scalar(f"routing_report/{group}/{b}", v, trainer.global_step)
        self.after = after
        write_report(trainer, "routing_accuracy", {"global_step": trainer.global_step, "before": self.before,
                                                   "after": after, "after_layers": self.after_layers})
        if self.picture_images:
            self.write_picture(trainer, self.picture_batches(trainer, pl_module))

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before, "before_maps": self.before_maps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")
        self.before_maps = state_dict.get("before_maps")
