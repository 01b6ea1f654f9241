"""The benchmark's reports: results.md (tables in the paper's layout, published numbers beside ours) and
results.png (Face Sim ours vs published, and ours per prompt category).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from src.evaluation import prompts as bp

RECOGNIZER_NOTE = (
    "Numbers measured with different face recognisers are not comparable: the published numbers use "
    "MTCNN + FaceNet (InceptionResnetV1, VGGFace2) on real photographs; ours use the recogniser named above."
)


def fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def markdown_table(protocol: str, ours: dict[str, Any], label: str, recognizer: str) -> list[str]:
    """The paper's table layout (Face Sim / CLIP-T / FID) with our row and the published rows."""
    lines = ["| Method | Face Sim (%) ↑ | CLIP-T (%) ↑ | FID ↓ | Source |", "|---|---|---|---|---|"]
    lines.append(f"| **{label}** | {fmt(ours.get('face_sim'))} | {fmt(ours.get('clip_t'))} | {fmt(ours.get('fid'))} "
                 f"| this run ({recognizer} recogniser) |")
    for method, nums in bp.PUBLISHED[protocol].items():
        lines.append(f"| {method} (published) | {fmt(nums['face_sim'])} | {fmt(nums['clip_t'])} | {fmt(nums['fid'])} "
                     f"| published (paper, {bp.PUBLISHED_RECOGNIZER}) |")
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> None:
    cfg = results["config"]
    label = f"ours ({results['model']})"
    lines = [f"# Identity-preservation benchmark ({results['world']} world)", "",
             f"Recogniser: **{results['recognizer']}**. {RECOGNIZER_NOTE}", ""]
    if results["world"] == "synthetic":
        lines += ["Synthetic world: cartoon identities scored by the tiny world's own face backbone (sliding-window "
                  "detector); CLIP scores come from the tiny, untrained CLIP. These numbers check the pipeline and "
                  "compare tiny checkpoints with each other only.", ""]
    single = results.get("single")
    if single:
        lines += [f"## Single-ID ({single['num_identities']} identities x {single['num_prompts']} prompts x "
                  f"{cfg['images']} images = {single['num_images']} images)", ""]
        lines += markdown_table("single", single, label, results["recognizer"]) + [""]
        lines += ["Face Sim by prompt category: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in single["per_category"].items()),
                  ""]
    multi = results.get("multi")
    if multi and "skipped" in multi:
        lines += ["## Multi-ID", "", f"Skipped: {multi['skipped']}", ""]
    elif multi:
        lines += [f"## Multi-ID ({multi['num_pairs']} pairs x {multi['num_prompts']} prompts x {cfg['images']} "
                  f"images = {multi['num_images']} images)", ""]
        lines += markdown_table("multi", multi, label, results["recognizer"]) + [""]
        lines += ["| Beyond the paper | value |", "|---|---|",
                  f"| right face count (%) | {fmt(multi.get('face_count_ok'))} |",
                  f"| duplicated identity (%) | {fmt(multi.get('duplicate_rate'))} |",
                  f"| routing accuracy in detected faces, last step (%) | {fmt(multi.get('routing_accuracy'))} |",
                  f"| no face found (%) | {fmt(multi.get('no_face_rate'))} |", ""]
    calib = results.get("recognizer_calibration")
    if calib:
        lines += [f"Synthetic face detector, on its own calibration renders: face-window recall "
                  f"{100 * calib['face_window_recall']:.0f}%, "
                  f"background rejection {100 * calib['background_rejection']:.0f}%, "
                  f"right face count {100 * calib['face_count_accuracy_on_calibration_renders']:.0f}% "
                  "(an upper bound on how far face counts and routing accuracy can be trusted here).", ""]
    lines += ["Rows marked *published* are the numbers printed in the UniPortrait paper, not measured here.", ""]
    path.write_text("\n".join(lines))


def write_plot(results: dict[str, Any], path: Path) -> None:
    """Face Sim ours vs published per protocol, and ours per prompt category (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in ("single", "multi") if results.get(p) and "skipped" not in results[p]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for i, p in enumerate(protocols):
        names = [f"ours ({results['recognizer']})"] + [f"{m}\n(published)" for m in bp.PUBLISHED[p]]
        vals = [results[p]["face_sim"]] + [v["face_sim"] for v in bp.PUBLISHED[p].values()]
        xs = np.arange(len(vals)) + i * (len(bp.PUBLISHED["single"]) + 2)
        ax.bar(xs, vals, color=["tab:blue"] + ["tab:gray"] * (len(vals) - 1))
        for x, n in zip(xs, names):
            ax.text(x, 1, n, rotation=90, ha="center", va="bottom", fontsize=7)
        ax.text(xs.mean(), max(vals) + 3, f"{p}-ID", ha="center")
    ax.set_xticks([])
    ax.set_ylabel("Face Sim (%)")
    ax.set_title("Face Sim: ours vs published (recognisers differ)")
    ax = axes[1]
    for i, p in enumerate(protocols):
        cats = results[p]["per_category"]
        ax.bar(np.arange(len(cats)) + 0.4 * i, list(cats.values()), width=0.4, label=f"{p}-ID")
        ax.set_xticks(np.arange(len(cats)) + 0.2 * (len(protocols) - 1), list(cats))
    ax.set_ylabel("Face Sim (%)")
    ax.set_title("ours, by prompt category")
    if protocols:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
