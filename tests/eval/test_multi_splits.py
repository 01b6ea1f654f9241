"""The multi-ID splits without a model: the fixed 3- / 4-person prompts and identity groups (deterministic,
documented sizes, distinct identities), Hungarian-matched routing accuracy, the markdown's break rows between
recognisers, and the contact sheet's colours."""
from __future__ import annotations

import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from src.conventions import IDENTITY_COLOURS
from src.evaluation import prompts as bp
from src.evaluation.benchmark import multi_unrouted
from src.evaluation.figures import TILE, identity_colours, routing_picture, write_contact_sheet
from src.evaluation.multi_scoring import SheetEntry, SplitScores
from src.evaluation.reports import BREAK, write_markdown
from src.metrics.multi_id import multi_id_score

IDS = [i for i, _ in bp.IDENTITIES]


def test_group_prompts_are_fixed_and_cover_the_pairs_categories():
    for n in (3, 4):
        prompts = bp.GROUP_PROMPTS[n]
        assert len(prompts) == 12 == len(set(prompts))
        assert {k: len(v) for k, v in bp.GROUP_CATEGORIES[n].items()} == {"action": 4, "context": 4, "style": 4}
        for p in prompts:
            assert all(f"{{c{i}}}" in p for i in range(1, n + 1)) and f"{{c{n + 1}}}" not in p
            assert bp.prompt_category(p) in bp.MULTI_CATEGORIES
    assert bp.GROUP_PROMPTS[2] == bp.MULTI_PROMPTS
    assert (bp.multi_prompt(bp.GROUP_PROMPTS[3][0], "man", "woman", "man")
            == "a man, a woman and a man sitting at a dinner table")
    assert bp.multi_prompt("a {c1} and a {c2} on the beach", "man", "woman") == "a man and a woman on the beach"
    with pytest.raises(ValueError, match="c3"):
        bp.multi_prompt(bp.GROUP_PROMPTS[3][0], "man", "woman")


def test_identity_groups_of_the_15_identities():
    assert bp.identity_groups(IDS, 2) == list(combinations(IDS, 2)) and len(bp.identity_groups(IDS, 2)) == 105
    for n, offsets in ((3, (0, 1, 3)), (4, (0, 1, 3, 7))):
        groups = bp.identity_groups(IDS, n)
        assert groups == bp.identity_groups(IDS, n)  # deterministic
        assert len(groups) == 15 == len(set(groups))
        assert all(len(set(g)) == n for g in groups)
        # group i: positions (i + offsets) mod 15, in list order
        assert groups[0] == tuple(IDS[o] for o in offsets)
        assert groups[14] == tuple(IDS[p] for p in sorted((14 + o) % 15 for o in offsets))
        assert set(Counter(x for g in groups for x in g).values()) == {n}  # each identity in n groups
        pairs = Counter(p for g in groups for p in combinations(g, 2))
        assert max(pairs.values()) == 1 and len(pairs) == 15 * math.comb(n, 2)  # no pair twice


def test_identity_groups_of_small_lists():
    assert bp.identity_groups(list("abcdefgh"), 4)[0] == ("a", "b", "d", "h")
    assert bp.identity_groups(list("abcd"), 3) == [("a", "b", "d"), ("a", "b", "c"), ("b", "c", "d"),
                                                   ("a", "c", "d")]
    assert bp.identity_groups(list("abcd"), 4) == [("a", "b", "c", "d")]  # the ruler does not fit: combinations
    assert bp.identity_groups(list("abc"), 3) == [("a", "b", "c")]
    assert bp.identity_groups(list("ab"), 3) == []
    for num in range(4, 9):
        groups = bp.identity_groups(list("abcdefgh"[:num]), 4)
        assert 0 < len(groups) <= num and all(len(set(g)) == 4 for g in groups)
    with pytest.raises(ValueError, match="5 people"):
        bp.identity_groups(IDS, 5)


class FixedFaces:
    """Two detected faces (left and right half of a 16 px image) with fixed embeddings."""

    def __init__(self, faces: torch.Tensor) -> None:
        self.faces = faces

    def embed_faces(self, image):
        return self.faces, torch.tensor([[0.0, 0.0, 8.0, 16.0], [8.0, 0.0, 16.0, 16.0]])


def routing_accuracy(faces: torch.Tensor, refs: torch.Tensor, maps: torch.Tensor) -> float:
    recognizer = FixedFaces(faces)
    scores = SplitScores(2, recognizer, None)
    image = np.zeros((16, 16, 3), np.uint8)
    _, boxes = recognizer.embed_faces(image)
    scores.add_routing(image, boxes, multi_id_score(faces, refs), [maps])
    return float(scores.routing.compute()["all"])


def test_routing_accuracy_uses_the_hungarian_matching():
    """References e0, e1. Faces with cosines [[0.6, 0.5], [0.5, 0.0]]: greedy matching pairs face 0 with
    reference 0 (0.6 + 0.0), Hungarian matching face 0 with reference 1 and face 1 with reference 0
    (0.5 + 0.5 = 1.0). Routing the left half (face 0) to identity 1 is right under the Hungarian matching."""
    refs = torch.eye(3)[:2]  # (2, 3)
    faces = torch.tensor([[0.6, 0.5, math.sqrt(1 - 0.61)], [0.5, 0.0, math.sqrt(0.75)]])
    left_to_1 = torch.zeros(1, 2, 4, 4)
    left_to_1[0, 1, :, :2] = 1
    left_to_1[0, 0, :, 2:] = 1
    assert multi_id_score(faces, refs).matched_face == (1, 0)
    assert routing_accuracy(faces, refs, left_to_1) == pytest.approx(1.0)
    assert routing_accuracy(faces, refs, left_to_1.flip(1)) == pytest.approx(0.0)
    # plain case: face j is identity j
    assert routing_accuracy(torch.eye(2), torch.eye(2), left_to_1.flip(1)) == pytest.approx(1.0)


def results_of(recognizer: str, world: str) -> dict:
    split = {"people": 2, "mode": "routed", "num_images": 4, "face_sim": 50.0, "clip_t": 20.0, "fid": None,
             "routing_accuracy": 75.0, "per_category": {"action": 50.0}, "num_groups": 2, "num_prompts": 2}
    single = {"num_images": 4, "face_sim": 40.0, "clip_t": 21.0, "fid": None, "per_category": {"style": 40.0},
              "num_identities": 2, "num_prompts": 2}
    return {"world": world, "model": "m.ckpt", "recognizer": recognizer, "config": {"images": 1}, "single": single,
            "multi": {"2": split, "3": {"skipped": "fewer than 3 identities"}}}


@pytest.mark.parametrize(("recognizer", "world", "breaks"), [("tiny", "synthetic", 2), ("dlib", "real", 2),
                                                             ("facenet", "synthetic", 2), ("facenet", "real", 0)])
def test_markdown_breaks_between_recognisers(tmp_path, recognizer, world, breaks):
    """Our rows and the published (facenet, real world) rows share a table only after a break row, unless this
    run used the same recogniser on the same world; every row names its recogniser and world."""
    path = tmp_path / "results.md"
    write_markdown(results_of(recognizer, world), path)
    md = path.read_text()
    assert md.count(BREAK) == breaks
    lines = md.splitlines()
    for table_head in ("## Single-ID", "## Multi-ID, the paper's protocol"):
        rows = [ln for ln in lines[lines.index(next(x for x in lines if x.startswith(table_head))):] if ln][1:6]
        ours = next(i for i, r in enumerate(rows) if r.startswith("| **ours"))
        published = next(i for i, r in enumerate(rows) if "(published)" in r)
        assert f"this run: {recognizer} recogniser, {world} world" in rows[ours]
        assert "published: facenet recogniser, real world" in rows[published]
        assert (BREAK in rows[ours + 1]) == (breaks > 0) and published == ours + 1 + (breaks > 0)
    assert "| 2 people | routed | 2 x 2 x 1 = 4 | 50.0 |" in md and "3 people: skipped" in md


def test_contact_sheet_colours_boxes_by_matched_identity(tmp_path):
    """Face 0 was matched to identity b, face 1 to nobody: face 0's box takes b's colour, face 1's white;
    the routing map shows each identity's colour where it is routed."""
    colours = identity_colours(["a", "b"])
    assert colours == {"a": IDENTITY_COLOURS[0], "b": IDENTITY_COLOURS[1]}
    image = np.zeros((32, 32, 3), np.uint8)
    routing = torch.zeros(2, 2, 2)
    routing[0, :, 0] = 1  # left column -> a
    routing[1, :, 1] = 1  # right column -> b
    entry = SheetEntry(("a", "b"), "a person and a person", image, np.array([[0, 0, 16, 16], [16, 16, 32, 32]],
                       np.float32), (None, 0), (0.0, 0.7), routing)
    picture = np.asarray(routing_picture(routing, [colours["a"], colours["b"]]))
    assert tuple(picture[TILE // 2, 0]) == IDENTITY_COLOURS[0] and tuple(picture[TILE // 2, -1]) == IDENTITY_COLOURS[1]
    path = tmp_path / "sheet.png"
    refs = [("a", np.full((8, 8, 3), 100, np.uint8)), ("b", np.full((8, 8, 3), 200, np.uint8))]
    write_contact_sheet(path, "2 people", refs, [entry], colours)
    from PIL import Image

    sheet = np.asarray(Image.open(path).convert("RGB"))
    # the generation tile (black) sits below the references: its first long black row / column, then its boxes
    black = (sheet == 0).all(-1)  # (H, W)
    y0, x0 = np.flatnonzero(black.sum(1) >= TILE // 4).min(), np.flatnonzero(black.sum(0) >= TILE // 4).min()
    assert y0 > TILE  # below the references row
    assert tuple(sheet[y0 + TILE // 4, x0]) == IDENTITY_COLOURS[1]  # face 0's box (left edge), identity b
    assert tuple(sheet[y0 + 3 * TILE // 4, x0 + TILE // 2]) == (255, 255, 255)  # face 1's box, unmatched


def test_multi_mode():
    """auto: unrouted exactly when the model has no routers; unrouted can be forced; routed needs routers."""
    assert multi_unrouted("auto", routed=False) and not multi_unrouted("auto", routed=True)
    assert multi_unrouted("unrouted", routed=True) and not multi_unrouted("routed", routed=True)
    with pytest.raises(ValueError, match="no routers"):
        multi_unrouted("routed", routed=False)
