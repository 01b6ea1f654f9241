"""The benchmark's pictures, written next to results.json / results.md:

results.png            Face Sim of this run per protocol / split | the published Face Sim | this run per
                       prompt category. This run and the published numbers sit on separate axes with a
                       visible break whenever the recogniser or the world differs (`reports.comparable`).
people{n}_metrics.png  one multi-ID split's metrics, beside the published numbers for that split (pairs only),
                       again on a separate axis with the break.
people{n}_sheet.png    the split's contact sheet: the references first (each framed in its identity's colour),
                       then generations with the detected face boxes coloured by the identity each face was
                       matched to (white: matched to nobody), each beside its last-step routing map coloured
                       with the same colours (a pixel's colour = the routing weights' mix of the identities'
                       colours; black = routed nowhere; an unrouted split is an even mix everywhere).
Every figure's title names the recogniser and the world.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from src.conventions import IDENTITY_COLOURS
from src.evaluation import prompts as bp
from src.evaluation.multi_scoring import SheetEntry
from src.evaluation.reports import PUBLISHED_SOURCE, comparable, source_label

TILE = 128  # px per picture on the contact sheet
SHEET_COLUMNS = 3  # (generation, routing map) pairs per row
SPLIT_METRICS: tuple[tuple[str, str], ...] = (
    ("face_sim", "Face Sim\n(greedy min)"), ("sim_matched", "Sim\nHungarian"), ("sim_mht", "Sim MHT\n(sum / R)"),
    ("leakage", "leakage ↓"), ("id_conf", "ID-Conf"), ("count_acc", "count\naccuracy"),
    ("duplicate_rate", "duplicated ↓"), ("no_face_rate", "no face ↓"), ("routing_accuracy", "routing\naccuracy"),
    ("clip_t", "CLIP-T"),
)
CATEGORY_ORDER = ("accessory", "action", "context", "style")


def identity_colours(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A fixed colour per identity, in list order (`IDENTITY_COLOURS`, repeating beyond 16 identities)."""
    return {n: IDENTITY_COLOURS[i % len(IDENTITY_COLOURS)] for i, n in enumerate(names)}


def _tile(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).convert("RGB").resize((TILE, TILE), Image.NEAREST)


def routing_picture(weights: torch.Tensor | None, colours: list[tuple[int, int, int]]) -> Image.Image:
    """(R, h, w) routing weights -> RGB tile: each pixel the weights' mix of the R colours (black = none)."""
    if weights is None:
        img = Image.new("RGB", (TILE, TILE), (90, 90, 90))
        ImageDraw.Draw(img).text((4, TILE // 2 - 6), "no routing map", fill=(255, 255, 255))
        return img
    w = F.interpolate(weights[None].float(), size=(TILE, TILE), mode="nearest")[0]  # (R, T, T)
    c = torch.tensor(colours, dtype=torch.float32)  # (R, 3)
    rgb = torch.einsum("rhw,rc->hwc", w, c).clamp(0, 255).round().to(torch.uint8)  # (T, T, 3)
    return Image.fromarray(rgb.numpy())


def _draw_boxes(img: Image.Image, entry: SheetEntry, colours: dict[str, tuple[int, int, int]]) -> None:
    scale = TILE / entry.image.shape[1], TILE / entry.image.shape[0]
    owner = {g: entry.names[j] for j, g in enumerate(entry.matched_face) if g is not None}  # face -> identity
    draw = ImageDraw.Draw(img)
    for g, (x0, y0, x1, y1) in enumerate(entry.boxes.tolist()):
        colour = colours[owner[g]] if g in owner else (255, 255, 255)
        draw.rectangle([x0 * scale[0], y0 * scale[1], x1 * scale[0] - 1, y1 * scale[1] - 1], outline=colour, width=2)


def write_contact_sheet(path: Path, title: str, references: Sequence[tuple[str, np.ndarray]],
                        entries: Sequence[SheetEntry], colours: dict[str, tuple[int, int, int]]) -> None:
    """References (name, uint8 image) in a first row, then each entry's generation beside its routing map."""
    font = ImageFont.load_default()
    gap, caption, head = 8, 40, 34
    ref_cols = max(1, min(len(references), 2 * SHEET_COLUMNS))
    ref_rows = -(-len(references) // ref_cols)
    gen_rows = -(-len(entries) // SHEET_COLUMNS)
    width = max(ref_cols * (TILE + gap), SHEET_COLUMNS * (2 * TILE + 2 * gap)) + gap
    height = head + ref_rows * (TILE + caption) + 16 + gen_rows * (TILE + caption) + gap
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 4), title, fill=(0, 0, 0), font=font)
    draw.text((gap, 18), "references (frame = identity colour); generation | routing map at the last step",
              fill=(80, 80, 80), font=font)
    for k, (name, image) in enumerate(references):
        x, y = gap + (k % ref_cols) * (TILE + gap), head + (k // ref_cols) * (TILE + caption)
        sheet.paste(_tile(image), (x, y))
        draw.rectangle([x - 3, y - 3, x + TILE + 2, y + TILE + 2], outline=colours[name], width=3)
        draw.text((x, y + TILE + 6), name, fill=(0, 0, 0), font=font)
    top = head + ref_rows * (TILE + caption) + 16
    draw.line([(gap, top - 8), (width - gap, top - 8)], fill=(0, 0, 0), width=1)
    for k, e in enumerate(entries):
        x, y = gap + (k % SHEET_COLUMNS) * (2 * TILE + 2 * gap), top + (k // SHEET_COLUMNS) * (TILE + caption)
        gen = _tile(e.image)
        _draw_boxes(gen, e, colours)
        route = routing_picture(e.routing, [colours[n] for n in e.names])
        _draw_boxes(route, e, colours)
        sheet.paste(gen, (x, y))
        sheet.paste(route, (x + TILE + 2, y))
        sims = " ".join(f"{s:.2f}" for s in e.matched)
        for i, line in enumerate(textwrap.wrap(e.prompt, width=2 * TILE // 6)[:2]):
            draw.text((x, y + TILE + 2 + 11 * i), line, fill=(0, 0, 0), font=font)
        draw.text((x, y + TILE + 24), f"matched cos: {sims}", fill=(80, 80, 80), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax: Any, labels: list[str], values: list[float | None], colour: str) -> None:
    xs = np.arange(len(labels))
    ax.bar(xs, [np.nan if v is None else v for v in values], color=colour)
    for x, v in zip(xs, values):
        ax.text(x, 1 if v is None else v + 1, "n/a" if v is None else f"{v:.1f}", ha="center", fontsize=7)
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylim(0, 1.12 * max([v for v in values if v is not None] + [1.0]) + 2)


def _break(fig: Any, left: Any, right: Any) -> None:
    """A visible break between two panels: a dashed vertical rule between their axes, and its reason."""
    fig.subplots_adjust(wspace=0.45)
    x = left.get_position().x1 + 0.25 * (right.get_position().x0 - left.get_position().x1)
    fig.add_artist(_plt().Line2D([x, x], [0.04, 0.85], transform=fig.transFigure, color="black", linestyle="--"))
    fig.text(x + 0.004, 0.45, "break: different recogniser / world, not comparable", rotation=90, ha="left",
             va="center", fontsize=7)


def write_split_plot(path: Path, results: dict[str, Any], people: int) -> None:
    """One split's metrics (this run) beside the published numbers for that split, on a separate axis."""
    plt = _plt()
    split = results["multi"][str(people)]
    fig, (ax, pub) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1.4]},
                                  sharey=comparable(results))
    _bars(ax, [lab for _, lab in SPLIT_METRICS], [split.get(k) for k, _ in SPLIT_METRICS], "tab:blue")
    ax.set_ylabel("% (CLIP-T: cosine x 100)")
    ax.set_title(f"{people} people, {split['mode']}: this run ({source_label(results)})", fontsize=9)
    if people == 2:
        names = [f"{m}\nFace Sim" for m in bp.PUBLISHED["multi"]] + [f"{m}\nCLIP-T" for m in bp.PUBLISHED["multi"]]
        vals = ([v["face_sim"] for v in bp.PUBLISHED["multi"].values()]
                + [v["clip_t"] for v in bp.PUBLISHED["multi"].values()])
        _bars(pub, names, vals, "tab:gray")
    else:
        pub.text(0.5, 0.5, f"no published numbers\nfor {people} people", ha="center", va="center",
                 transform=pub.transAxes)
        pub.set_xticks([])
    pub.set_title(f"published ({PUBLISHED_SOURCE})", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.18, top=0.85, wspace=0.3)
    if not comparable(results):
        _break(fig, ax, pub)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def measured_protocols(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, summary) of each measured protocol / split: single-ID, then the multi-ID splits by size."""
    out = []
    if results.get("single") and "skipped" not in results["single"]:
        out.append(("single-ID", results["single"]))
    for n, split in sorted((results.get("multi") or {}).items()):
        if "skipped" not in split:
            suffix = "\nunrouted" if split["mode"] != "routed" else ""
            out.append((f"{n} people{suffix}", split))
    return out


def write_plot(results: dict[str, Any], path: Path) -> None:
    """results.png: this run's Face Sim | the published Face Sim (separate axis, with the break) | per category."""
    plt = _plt()
    measured = measured_protocols(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 6), gridspec_kw={"width_ratios": [2, 1.3, 2.5]})
    ours, pub, cats = axes
    _bars(ours, [lab for lab, _ in measured], [s["face_sim"] for _, s in measured], "tab:blue")
    ours.set_ylabel("Face Sim (%)")
    ours.set_title(f"this run: {source_label(results)}", fontsize=9)
    published = [("single-ID", bp.PUBLISHED["single"]), ("2 people", bp.PUBLISHED["multi"])]
    labels = [f"{m}\n{p}" for p, nums in published for m in nums]
    _bars(pub, labels, [v["face_sim"] for _, nums in published for v in nums.values()], "tab:gray")
    pub.tick_params(axis="x", labelrotation=90)
    pub.set_title(f"published: {PUBLISHED_SOURCE}", fontsize=9)
    if comparable(results):
        pub.sharey(ours)
    width = 0.8 / max(len(measured), 1)
    for i, (label, s) in enumerate(measured):
        per = s.get("per_category", {})
        xs = [c for c, cat in enumerate(CATEGORY_ORDER) if per.get(cat) is not None]
        cats.bar(np.array(xs) + i * width, [per[CATEGORY_ORDER[c]] for c in xs], width=width, label=label)
    cats.set_xticks(np.arange(len(CATEGORY_ORDER)) + width * (len(measured) - 1) / 2, list(CATEGORY_ORDER))
    cats.set_ylabel("Face Sim (%)")
    cats.set_title(f"this run by prompt category ({source_label(results)})", fontsize=9)
    if measured:
        cats.legend(fontsize=7)
    fig.suptitle(f"Face Sim: model {results['model']}; this run: {source_label(results)}", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.3, top=0.85, wspace=0.3)
    if not comparable(results):
        _break(fig, ours, pub)
    fig.savefig(path, dpi=100)
    plt.close(fig)
