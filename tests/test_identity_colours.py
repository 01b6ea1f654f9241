"""Identity slot n has one colour in every picture (`src.conventions.IDENTITY_COLOURS`): the routing panels
and routing_maps.png (callbacks), generate's routing-map PNGs and the web demo's legend (src.inference.io,
src.web), and the evaluation sheets (src.evaluation.figures)."""
from __future__ import annotations

import torch

from callbacks.routing_maps import colourise
from src.conventions import IDENTITY_COLOURS
from src.evaluation.figures import identity_colours
from src.inference.io import routing_colours
from src.web.handlers import hex_colour

SLOTS = len(IDENTITY_COLOURS) + 1  # one past the palette: slot 16 takes slot 0's colour


def test_every_picture_draws_identity_n_in_the_same_colour():
    assert len(set(IDENTITY_COLOURS)) == len(IDENTITY_COLOURS) == 16
    expected = [IDENTITY_COLOURS[n % 16] for n in range(SLOTS)]
    one_hot = torch.eye(SLOTS)[:, None, :]  # (N, 1, N): pixel n belongs to slot n
    panel = colourise(one_hot[None], (1, SLOTS))[0]  # (3, 1, N) in [0, 1]
    assert [tuple(int(v) for v in px) for px in (panel[:, 0].T * 255).round()] == expected
    png, claimed = routing_colours(one_hot)  # (1, N, 3) uint8
    assert [tuple(int(v) for v in px) for px in png[0]] == expected and claimed.all()
    assert [hex_colour(n) for n in range(SLOTS)] == ["#{:02x}{:02x}{:02x}".format(*c) for c in expected]
    names = [f"person {n}" for n in range(SLOTS)]
    assert [identity_colours(names)[name] for name in names] == expected
