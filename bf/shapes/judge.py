"""Does an image show what its prompt asks for? Per-attribute verdicts, GenEval-style."""

from __future__ import annotations

from bf.shapes.detect import Detection
from bf.shapes.scenes import Scene

SINGLE_ATTRIBUTES = ("count", "color", "shape", "size", "position")
TWO_ATTRIBUTES = ("count", "color", "shape", "relation")


def _relation_holds(rel: str, a: Detection, b: Detection) -> bool:
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    horizontal = abs(dx) > abs(dy)
    return {
        "to the left of": horizontal and dx < 0,
        "to the right of": horizontal and dx > 0,
        "above": not horizontal and dy < 0,
        "below": not horizontal and dy > 0,
    }[rel]


def judge(scene: Scene, found: list[Detection]) -> dict[str, bool]:
    """Verdict per attribute and ``overall`` (every attribute right)."""
    found = sorted(found, key=lambda d: -d.area)
    if len(scene.objects) == 1:
        want = scene.objects[0]
        got = found[0] if found else None
        v = {
            "count": len(found) == 1,
            "color": got is not None and got.color == want.color,
            "shape": got is not None and got.shape == want.shape and got.color == want.color,
            "size": got is not None and got.size == want.size,
            "position": got is not None and got.position == want.position,
        }
    else:
        a_want, b_want = scene.objects
        top = found[:2]

        def match(o):
            return next((d for d in top if (d.shape, d.color) == (o.shape, o.color)), None)

        a, b = match(a_want), match(b_want)
        v = {
            "count": len(found) == 2,
            "color": sorted(d.color for d in top) == sorted(o.color for o in scene.objects),
            "shape": a is not None and b is not None and a is not b,
            "relation": a is not None and b is not None and a is not b and _relation_holds(scene.relation, a, b),
        }
    v["overall"] = all(v.values())
    return v
