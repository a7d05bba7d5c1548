"""Scene specifications, captions, and the train / test / held-out splits.

Attribute combinations in ``HELDOUT_PAIRS`` (a shape in a color) never appear in a
training scene, in either object: the ``heldout`` split (one object of a held-out pair) and
the ``heldout-two`` split (two objects, at least one of a held-out pair, in a relation)
measure compositional generalisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
# object 0 relative to object 1 -> (position of object 0, position of object 1)
RELATIONS = {
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
HELDOUT_PAIRS = frozenset({("triangle", "green"), ("circle", "purple"), ("square", "orange")})
TRAIN_PAIRS = tuple((s, c) for s in SHAPES for c in COLORS if (s, c) not in HELDOUT_PAIRS)
SPLITS = ("single", "two", "heldout", "heldout-two")

_WHERE = {
    "left": ("on the left", "at the left side"),
    "right": ("on the right", "at the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_SINGLE_TEMPLATES = (
    "a {size} {color} {shape} {where}",
    "a photo of a {size} {color} {shape} {where}",
    "an image of a {size} {color} {shape} {where}",
    "{where}, a {size} {color} {shape}",
    "one {size} {color} {shape} {where}",
    "a {color} {shape}, {size}, {where}",
)
_TWO_TEMPLATES = (
    "a {c0} {s0} {rel} a {c1} {s1}",
    "a {c0} {s0} is {rel} a {c1} {s1}",
    "an image of a {c0} {s0} {rel} a {c1} {s1}",
    "{c0} {s0} {rel} {c1} {s1}",
)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relation: str | None = None  # two objects: object 0 relative to object 1

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {(o.shape, o.color) for o in self.objects}


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The canonical caption, or with ``rng`` a random wording of it."""

    def pick(options):
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    if len(scene.objects) == 1:
        o = scene.objects[0]
        return pick(_SINGLE_TEMPLATES).format(size=o.size, color=o.color, shape=o.shape, where=pick(_WHERE[o.position]))
    a, b = scene.objects
    return pick(_TWO_TEMPLATES).format(c0=a.color, s0=a.shape, rel=scene.relation, c1=b.color, s1=b.shape)


_SINGLE_RE = re.compile(r"^a (small|large) (\w+) (\w+) (.+)$")
_TWO_RE = re.compile(r"^a (\w+) (\w+) (to the left of|to the right of|above|below) a (\w+) (\w+)$")
_WHERE_CANON = {v[0]: k for k, v in _WHERE.items()}


def parse_prompt(text: str) -> Scene | None:
    """A scene from a canonical caption ("a small red circle on the left",
    "a red circle to the left of a blue square"); None if it is not one."""
    text = text.strip().lower()
    m = _TWO_RE.match(text)
    if m and m[1] in COLORS and m[2] in SHAPES and m[4] in COLORS and m[5] in SHAPES:
        p0, p1 = RELATIONS[m[3]]
        return Scene((Obj(m[2], m[1], "any", p0), Obj(m[5], m[4], "any", p1)), relation=m[3])
    m = _SINGLE_RE.match(text)
    if m and m[2] in COLORS and m[3] in SHAPES and m[4] in _WHERE_CANON:
        return Scene((Obj(m[3], m[2], m[1], _WHERE_CANON[m[4]]),))
    return None


def sample_scene(rng: np.random.Generator, heldout: bool = False, p_two: float = 0.5) -> Scene:
    """A random training scene (no held-out pair), or a held-out single-object scene."""
    if heldout:
        shape, color = sorted(HELDOUT_PAIRS)[int(rng.integers(len(HELDOUT_PAIRS)))]
        return Scene((Obj(shape, color, SIZES[int(rng.integers(2))], POSITIONS[int(rng.integers(5))]),))
    if rng.random() >= p_two:
        shape, color = TRAIN_PAIRS[int(rng.integers(len(TRAIN_PAIRS)))]
        return Scene((Obj(shape, color, SIZES[int(rng.integers(2))], POSITIONS[int(rng.integers(5))]),))
    i, j = rng.choice(len(TRAIN_PAIRS), size=2, replace=False)
    rel = tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    p0, p1 = RELATIONS[rel]
    objs = tuple(Obj(*TRAIN_PAIRS[k], SIZES[int(rng.integers(2))], p) for k, p in ((i, p0), (j, p1)))
    return Scene(objs, relation=rel)


TEST_SCENES = 30  # per split: the standard test set
# distinct prompts of the drawn splits: ordered pairs of distinct shape-color pairs x relations (a two-object
# caption names no size, and the detector does not judge one)
SPACE_SIZE = {"two": len(TRAIN_PAIRS) * (len(TRAIN_PAIRS) - 1) * len(RELATIONS),
              "heldout-two": (18 * 17 - len(TRAIN_PAIRS) * (len(TRAIN_PAIRS) - 1)) * len(RELATIONS)}  # fmt: skip


def split_space(split: str) -> list[Scene] | None:
    """Every distinct scene of a split when there are few (single: 150, heldout: 30), else None (two and
    heldout-two: ``SPACE_SIZE`` distinct prompts, drawn at random)."""
    if split == "single":
        return [Scene((Obj(s, c, size, pos),)) for s, c in TRAIN_PAIRS for size in SIZES for pos in POSITIONS]
    if split == "heldout":
        return [Scene((Obj(s, c, size, pos),)) for s, c in sorted(HELDOUT_PAIRS) for size in SIZES for pos in POSITIONS]
    if split in ("two", "heldout-two"):
        return None
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def eval_scenes(split: str, n: int = TEST_SCENES) -> list[Scene]:
    """The first ``n`` test scenes of a split, the same on every machine: the standard 30 first, then more distinct
    scenes (all of a small split's space at most: ``split_space``)."""
    if split == "single":
        first = [Scene((Obj(s, c, SIZES[k % 2], POSITIONS[(3 * k + i) % 5]),)) for i, (s, c) in enumerate(TRAIN_PAIRS) for k in range(2)]
    elif split == "heldout":
        first = split_space("heldout")
    elif split == "heldout-two":
        return _sampled(_heldout_two_scene, 20261130, min(n, SPACE_SIZE[split]))
    elif split == "two":
        return _sampled(lambda rng: sample_scene(rng, p_two=1.0), 20261122, min(n, SPACE_SIZE[split]))
    else:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n <= len(first):
        return first[:n]
    rest = [sc for sc in split_space(split) if sc not in first]
    order = np.random.default_rng(20261201).permutation(len(rest))
    return first + [rest[i] for i in order][: n - len(first)]


def _sampled(draw, seed: int, n: int) -> list[Scene]:
    """``n`` scenes of distinct prompts drawn in turn from ``draw(rng)`` (rng seeded by ``seed``); a draw whose caption
    repeats one already drawn (the same scene, or two objects differing only in size) is skipped."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    seen: set[str] = set()
    while len(scenes) < n:
        sc = draw(rng)
        if sc is not None and (text := caption(sc)) not in seen:
            seen.add(text)
            scenes.append(sc)
    return scenes


_HELD, _EVERY = sorted(HELDOUT_PAIRS), [(s, c) for s in SHAPES for c in COLORS]


def _heldout_two_scene(rng: np.random.Generator) -> Scene | None:
    """A two-object scene with at least one held-out pair (on either side of the relation), the other object any
    other shape-color pair; sizes and relations drawn like the training scenes' (None: a draw of the same pair twice)."""
    pair = [_HELD[int(rng.integers(len(_HELD)))], _EVERY[int(rng.integers(len(_EVERY)))]]
    if pair[0] == pair[1]:
        return None
    if rng.random() < 0.5:
        pair.reverse()
    rel = tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    objs = tuple(Obj(*pr, SIZES[int(rng.integers(2))], p) for pr, p in zip(pair, RELATIONS[rel], strict=True))
    return Scene(objs, relation=rel)
