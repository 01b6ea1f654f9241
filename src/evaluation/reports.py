"""The benchmark's results.md: the paper's tables (single-ID, multi-ID pairs; published numbers beside ours)
and the multi-ID splits table (2 / 3 / 4 people, the metrics of the newer benchmarks). Pictures: figures.py.

Every table has a Source column naming the recogniser and the world of each row ("this run: tiny
recogniser, synthetic world" / "published: facenet recogniser, real world"). Rows measured with another
recogniser or on another world than the rows above them follow a break row (`BREAK`), so figures that
are not comparable never share a column unmarked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from src.evaluation import prompts as bp

RECOGNIZER_NOTE = (
    "Numbers measured with different face recognisers are not comparable: the published numbers use "
    "MTCNN + FaceNet (InceptionResnetV1, VGGFace2) on real photographs; ours use the recogniser named above."
)
PUBLISHED_WORLD = "real"  # the paper's 15 CelebA identities
PUBLISHED_SOURCE = f"{bp.PUBLISHED_RECOGNIZER} recogniser, {PUBLISHED_WORLD} world"
BREAK = "not comparable with the rows above"  # text of a break row


def fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def source_label(results: dict[str, Any]) -> str:
    """"<recogniser> recogniser, <world> world" of this run."""
    return f"{results['recognizer']} recogniser, {results['world']} world"


def comparable(results: dict[str, Any]) -> bool:
    """Whether this run's Face Sim shares the published numbers' recogniser and world."""
    return results["recognizer"] == bp.PUBLISHED_RECOGNIZER and results["world"] == PUBLISHED_WORLD


def break_row(columns: int, results: dict[str, Any]) -> str:
    return (f"| *— break: the rows below were measured with the {PUBLISHED_SOURCE}; {BREAK} "
            f"({source_label(results)}) —* |" + " |" * (columns - 1))


def markdown_table(protocol: str, ours: dict[str, Any], label: str, results: dict[str, Any]) -> list[str]:
    """The paper's table layout (Face Sim / CLIP-T / FID) with our row and the published rows."""
    lines = ["| Method | Face Sim (%) ↑ | CLIP-T (%) ↑ | FID ↓ | Source |", "|---|---|---|---|---|"]
    lines.append(f"| **{label}** | {fmt(ours.get('face_sim'))} | {fmt(ours.get('clip_t'))} | {fmt(ours.get('fid'))} "
                 f"| this run: {source_label(results)} |")
    if not comparable(results):
        lines.append(break_row(5, results))
    for method, nums in bp.PUBLISHED[protocol].items():
        lines.append(f"| {method} (published) | {fmt(nums['face_sim'])} | {fmt(nums['clip_t'])} | {fmt(nums['fid'])} "
                     f"| published: {PUBLISHED_SOURCE} |")
    return lines


SPLIT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("face_sim", "Face Sim (greedy min) ↑"), ("sim_matched", "Sim Hungarian ↑"), ("sim_mht", "Sim MHT ↑"),
    ("leakage", "leakage ↓"), ("id_conf", "ID-Conf ↑"), ("count_acc", "count acc. ↑"),
    ("duplicate_rate", "duplicated ↓"), ("no_face_rate", "no face ↓"), ("routing_accuracy", "routing acc. ↑"),
    ("clip_t", "CLIP-T ↑"),
)


def splits_table(results: dict[str, Any]) -> list[str]:
    """One row per measured multi-ID split: the multi-identity metrics, all from this run's recogniser."""
    head = ["Split", "Mode", "Groups x prompts x images"] + [name for _, name in SPLIT_COLUMNS] + ["Source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    images = results["config"]["images"]
    for n, s in sorted(results["multi"].items()):
        if "skipped" in s:
            continue
        cells = [f"{n} people", s["mode"], f"{s['num_groups']} x {s['num_prompts']} x {images} = {s['num_images']}"]
        cells += [("no router" if k == "routing_accuracy" and s["mode"] != "routed" else fmt(s.get(k)))
                  for k, _ in SPLIT_COLUMNS] + [f"this run: {source_label(results)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def split_notes(results: dict[str, Any]) -> list[str]:
    out = []
    for n, s in sorted(results["multi"].items()):
        if "skipped" in s:
            out.append(f"- {n} people: skipped ({s['skipped']})")
            continue
        cats = ", ".join(f"{k} {fmt(v)}" for k, v in s["per_category"].items())
        out.append(f"- {n} people: Face Sim by prompt category: {cats}; pictures: people{n}_metrics.png, "
                   f"people{n}_sheet.png")
    return out


def write_markdown(results: dict[str, Any], path: Path) -> None:
    cfg = results["config"]
    label = f"ours ({results['model']})"
    lines = [f"# Identity-preservation benchmark ({results['world']} world)", "",
             f"Recogniser: **{results['recognizer']}**, world: **{results['world']}**. {RECOGNIZER_NOTE}", ""]
    if results["world"] == "synthetic":
        lines += ["Synthetic world: cartoon identities scored by the tiny world's own face backbone (sliding-window "
                  "detector); CLIP scores come from the tiny, untrained CLIP. These numbers check the pipeline and "
                  "compare tiny checkpoints with each other only.", ""]
    single = results.get("single")
    if single:
        lines += [f"## Single-ID ({single['num_identities']} identities x {single['num_prompts']} prompts x "
                  f"{cfg['images']} images = {single['num_images']} images)", ""]
        lines += markdown_table("single", single, label, results) + [""]
        lines += ["Face Sim by prompt category: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in single["per_category"].items()),
                  ""]
    multi = results.get("multi") or {}
    pairs = multi.get("2")
    if pairs and "skipped" not in pairs:
        mode = "" if pairs["mode"] == "routed" else f", {pairs['mode']}"
        lines += [f"## Multi-ID, the paper's protocol ({pairs['num_groups']} pairs x {pairs['num_prompts']} prompts "
                  f"x {cfg['images']} images = {pairs['num_images']} images{mode})", ""]
        lines += markdown_table("multi", pairs, f"{label}{mode}", results) + [""]
    if multi:
        lines += ["## Multi-ID splits: 2, 3 and 4 people (beyond the paper)", "",
                  "Face Sim: the paper's (greedy matching, minimum over identities). Sim Hungarian: MultiID-Bench "
                  "Sim(Ref) (mean of the Hungarian-matched cosines; images without a detected face are left out of it, "
                  "the no-face rate counts them); Sim MHT: MultiHuman-Testbench (matched cosines "
                  "summed / people, a missing face counts 0); leakage: mean cosine of the non-matched pairs; "
                  "ID-Conf: UMO's; routing accuracy: last denoising step, inside the detected faces matched "
                  "(Hungarian) to each identity. Rows marked *unrouted (no router)* were generated by a model "
                  "without routers, every identity applied everywhere with equal weight: the comparison that "
                  "shows what routing buys.", ""]
        lines += splits_table(results) + [""] + split_notes(results) + [""]
    calib = results.get("recognizer_calibration")
    if calib:
        lines += [f"Synthetic face detector, on its own calibration renders: face-window recall "
                  f"{100 * calib['face_window_recall']:.0f}%, "
                  f"background rejection {100 * calib['background_rejection']:.0f}%, "
                  f"right face count {100 * calib['face_count_accuracy_on_calibration_renders']:.0f}% "
                  "(an upper bound on how far face counts and routing accuracy can be trusted here).", ""]
    lines += ["Rows marked *published* are the numbers printed in the UniPortrait paper, not measured here.", ""]
    path.write_text("\n".join(lines))
