"""The identity-preservation benchmark's fixed lists (FastComposer protocol, used by the UniPortrait paper).

- `IDENTITIES`: the 15 CelebA evaluation identities with their class words (reference photos are
  `<references>/<id>.jpg`, by default `../shared/data/celeba_eval/`).
- `SINGLE_PROMPTS`: the 40 single-subject templates, 10 per category (accessory, style, action,
  context); `{c}` is the class word.
- `MULTI_PROMPTS`: this project's own FIXED set of 21 two-subject templates (the paper does not list
  its 21). `{c1}` / `{c2}` are the class words of the pair's first / second identity. They are
  chosen to mirror the single-ID categories (7 action, 7 context, 7 style) and always describe the
  two people side by side, so two faces are expected in every image. Changing this list changes
  the benchmark: don't.
- `GROUP_PROMPTS`: this project's own FIXED sets of 12 three-person and 12 four-person templates
  (4 action, 4 context, 4 style each, mirroring the pairs' categories; `{c1}`..`{c4}` are the class
  words of the group's identities in group order). Beyond the paper: they extend its pairs to the
  3- and 4-person splits of the newer multi-identity benchmarks. Don't change them either.
- `identity_groups`: the identity groups of a split: every pair for 2 people (as in the paper), and
  for 3 / 4 people the N cyclic shifts of a Golomb ruler over the identity list (see its docstring).
- `PUBLISHED`: the numbers published in the paper (Face Sim % / CLIP-T % / FID), for the tables.
"""
from __future__ import annotations

from itertools import combinations

# (CelebA id, class word): ../shared/reference/eval-benchmark.md
IDENTITIES: tuple[tuple[str, str], ...] = (
    ("000001", "man"), ("000181", "man"), ("000268", "man"), ("000612", "woman"), ("000667", "woman"),
    ("001603", "woman"), ("001854", "man"), ("002088", "woman"), ("002464", "woman"), ("002782", "man"),
    ("002880", "woman"), ("002929", "woman"), ("002937", "woman"), ("003785", "man"), ("004153", "woman"),
)

SINGLE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "accessory": (
        "a {c} wearing a red hat", "a {c} wearing a santa hat", "a {c} wearing a rainbow scarf",
        "a {c} wearing a black top hat and a monocle", "a {c} in a chef outfit", "a {c} in a firefighter outfit",
        "a {c} in a police outfit", "a {c} wearing pink glasses", "a {c} wearing a yellow shirt",
        "a {c} in a purple wizard outfit",
    ),
    "style": (
        "a painting of a {c} in the style of Banksy", "a painting of a {c} in the style of Vincent Van Gogh",
        "a colorful graffiti painting of a {c}", "a watercolor painting of a {c}", "a Greek marble sculpture of a {c}",
        "a street art mural of a {c}", "a black and white photograph of a {c}", "a pointillism painting of a {c}",
        "a Japanese woodblock print of a {c}", "a street art stencil of a {c}",
    ),
    "action": (
        "a {c} riding a horse", "a {c} holding a glass of wine", "a {c} holding a piece of cake",
        "a {c} giving a lecture", "a {c} reading a book", "a {c} gardening in the backyard", "a {c} cooking a meal",
        "a {c} working out at the gym", "a {c} walking the dog", "a {c} baking cookies",
    ),
    "context": (
        "a {c} in the jungle", "a {c} in the snow", "a {c} on the beach", "a {c} on a cobblestone street",
        "a {c} on top of pink fabric", "a {c} on top of a wooden floor", "a {c} with a city in the background",
        "a {c} with a mountain in the background", "a {c} with a blue house in the background",
        "a {c} on top of a purple rug in a forest",
    ),
}
SINGLE_PROMPTS: tuple[str, ...] = tuple(p for group in SINGLE_CATEGORIES.values() for p in group)

# The project's own fixed 21 two-person prompts (7 action, 7 context, 7 style).
MULTI_PROMPTS: tuple[str, ...] = (
    # action
    "a {c1} and a {c2} sitting in a cafe",
    "a {c1} and a {c2} shaking hands",
    "a {c1} and a {c2} cooking a meal together",
    "a {c1} and a {c2} reading a book together",
    "a {c1} and a {c2} playing chess",
    "a {c1} and a {c2} walking the dog",
    "a {c1} and a {c2} holding glasses of wine",
    # context
    "a {c1} and a {c2} on the beach",
    "a {c1} and a {c2} in the snow",
    "a {c1} and a {c2} in the jungle",
    "a {c1} and a {c2} on a cobblestone street",
    "a {c1} and a {c2} with a city in the background",
    "a {c1} and a {c2} with a mountain in the background",
    "a {c1} and a {c2} in front of a blue house",
    # style
    "a painting of a {c1} and a {c2} in the style of Vincent Van Gogh",
    "a watercolor painting of a {c1} and a {c2}",
    "a black and white photograph of a {c1} and a {c2}",
    "a Japanese woodblock print of a {c1} and a {c2}",
    "a colorful graffiti painting of a {c1} and a {c2}",
    "a pointillism painting of a {c1} and a {c2}",
    "a street art mural of a {c1} and a {c2}",
)
MULTI_CATEGORIES: dict[str, tuple[str, ...]] = {
    "action": MULTI_PROMPTS[0:7], "context": MULTI_PROMPTS[7:14], "style": MULTI_PROMPTS[14:21],
}

# The project's own fixed 3- and 4-person prompts (4 action, 4 context, 4 style each).
_PEOPLE = {3: "a {c1}, a {c2} and a {c3}", 4: "a {c1}, a {c2}, a {c3} and a {c4}"}
GROUP_CATEGORIES: dict[int, dict[str, tuple[str, ...]]] = {
    n: {
        "action": (f"{who} sitting at a dinner table", f"{who} playing cards", f"{who} cooking a meal together",
                   f"{who} walking in a park"),
        "context": (f"{who} on the beach", f"{who} in the snow", f"{who} on a cobblestone street",
                    f"{who} with a mountain in the background"),
        "style": (f"a painting of {who} in the style of Vincent Van Gogh", f"a watercolor painting of {who}",
                  f"a black and white photograph of {who}", f"a street art mural of {who}"),
    }
    for n, who in _PEOPLE.items()
}
GROUP_PROMPTS: dict[int, tuple[str, ...]] = {
    2: MULTI_PROMPTS, **{n: tuple(p for g in cats.values() for p in g) for n, cats in GROUP_CATEGORIES.items()},
}
SPLIT_SIZES: tuple[int, ...] = (2, 3, 4)  # people per image in the multi-ID splits
# Golomb rulers (all pairwise differences distinct): the offsets of the 3- and 4-person groups (identity_groups).
GROUP_OFFSETS: dict[int, tuple[int, ...]] = {3: (0, 1, 3), 4: (0, 1, 3, 7)}

# Published numbers (Face Sim % / CLIP-T % / FID); None = not reported.
PUBLISHED: dict[str, dict[str, dict[str, float | None]]] = {
    "single": {
        "UniPortrait": {"face_sim": 71.1, "clip_t": 26.1, "fid": 123.4},
        "IP-Adapter-FaceID-PlusV2": {"face_sim": 68.4, "clip_t": 24.7, "fid": 139.5},
        "FastComposer": {"face_sim": 50.8, "clip_t": 24.1, "fid": 134.5},
    },
    "multi": {
        "UniPortrait": {"face_sim": 67.3, "clip_t": 27.4, "fid": 139.5},
        "FastComposer": {"face_sim": 38.0, "clip_t": 25.5, "fid": 156.6},
    },
}
PUBLISHED_RECOGNIZER = "facenet"  # the FastComposer protocol: MTCNN + InceptionResnetV1 (VGGFace2)


def single_prompt(template: str, class_word: str) -> str:
    """A single-ID template filled with a class word ("a {c} in the snow", "man") -> "a man in the snow"."""
    return template.format(c=class_word)


def multi_prompt(template: str, *class_words: str) -> str:
    """A multi-person template filled with the class words, in group order ("{c1}" <- class_words[0], ...)."""
    fields = {f"c{i + 1}": w for i, w in enumerate(class_words)}
    try:
        return template.format(**fields)
    except KeyError as err:
        raise ValueError(f"template {template!r} needs {err.args[0]}, got {len(class_words)} class words") from err


def prompt_category(template: str) -> str:
    """The category ("accessory", "style", "action", "context") of a single- or multi-ID template."""
    for categories in (SINGLE_CATEGORIES, MULTI_CATEGORIES, *GROUP_CATEGORIES.values()):
        for name, group in categories.items():
            if template in group:
                return name
    raise KeyError(f"template {template!r} is not one of the benchmark prompts")


def all_pairs(ids: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Every unordered pair of `ids`, in lexicographic order of positions (15 ids -> 105 pairs)."""
    return list(combinations(ids, 2))


def identity_groups(ids: list[str] | tuple[str, ...], n: int) -> list[tuple[str, ...]]:
    """The identity groups of the n-person split, each in identity-list order, all distinct.

    n = 2: every unordered pair (`all_pairs`, the paper's protocol; 15 ids -> 105 pairs).
    n = 3, 4: group i (i = 0..N-1) holds the identities at positions (i + o) mod N for the offsets
    `GROUP_OFFSETS[n]` = (0, 1, 3) / (0, 1, 3, 7). The offsets form a Golomb ruler, so with N = 15
    every identity is in exactly n groups and no two identities share more than one group (15 groups
    each; 45 / 90 of the 105 pairs occur once). Small lists (N <= the largest offset) fall back to all
    combinations when there are at most N of them, else to N combinations spread evenly.
    Duplicate groups (several shifts giving the same set) are kept once. Fewer than n ids -> [].
    """
    ids = list(ids)
    num = len(ids)
    if n == 2:
        return all_pairs(ids)
    if n not in GROUP_OFFSETS:
        raise ValueError(f"no identity groups defined for {n} people (splits: {SPLIT_SIZES})")
    if num < n:
        return []
    offsets = GROUP_OFFSETS[n]
    if len({o % num for o in offsets}) < n:  # the ruler does not fit: combinations instead
        return spread(list(combinations(ids, n)), num)
    out: list[tuple[str, ...]] = []
    for i in range(num):
        group = tuple(ids[p] for p in sorted((i + o) % num for o in offsets))
        if group not in out:
            out.append(group)
    return out


def spread(items: list, k: int | None) -> list:
    """`k` items spread evenly over `items` (all when k is None or >= len); keeps the order.

    Used for the subset options, so a quick run still covers every prompt category / identity mix.
    """
    if k is None or k >= len(items):
        return list(items)
    if k <= 0:
        raise ValueError(f"subset size must be positive, got {k}")
    idx = sorted({round(i * (len(items) - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [0]
    return [items[i] for i in idx]
