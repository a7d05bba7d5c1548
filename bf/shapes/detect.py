"""Finding the objects of a shapes image: color segmentation, then shape, size, position.

Each pixel far enough from the background and near a palette color (edge pixels that
blend an object into the background are neither) is assigned the nearest palette color;
connected regions of one color are objects. Shape follows from how much of its
bounding box a region fills (square ~1, circle ~pi/4, triangle ~1/2), size from the
bounding box, position from the nearest anchor.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from bf.shapes.render import ANCHORS, BACKGROUND, HALF_EXTENT, PALETTE, RESOLUTION

FOREGROUND_DISTANCE = 70.0  # RGB distance from the background
PALETTE_DISTANCE = 80.0  # a pixel farther from every palette color is an edge blend, not an object
MIN_AREA_FRACTION = 40 / RESOLUTION**2  # smaller regions are noise
_COLOR_NAMES = tuple(PALETTE)
_PALETTE = np.asarray([PALETTE[c] for c in _COLOR_NAMES], np.float32)
_SIZE_SPLIT = (HALF_EXTENT["small"] + HALF_EXTENT["large"]) / 2


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]  # x, y in pixels of a 128-pixel image
    area: int
    fill: float


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of flat indices."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for start in np.flatnonzero(mask):
        if seen.flat[start]:
            continue
        seen.flat[start] = True
        queue, members = deque([start]), []
        while queue:
            p = queue.popleft()
            members.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - 1, x > 0), (p + 1, x < w - 1), (p - w, y > 0), (p + w, y < h - 1)):
                if ok and mask.flat[q] and not seen.flat[q]:
                    seen.flat[q] = True
                    queue.append(q)
        out.append(np.asarray(members))
    return out


def _widest_row_at(ys: np.ndarray, xs: np.ndarray) -> float:
    """Where a region's widest row lies, from its top (0) to its bottom (1)."""
    rows = ys - ys.min()
    width = np.bincount(rows, minlength=rows.max() + 1)
    return float(np.argmax(width) / max(rows.max(), 1))


def detect(image: np.ndarray, palette: dict | None = None, diamonds: bool = False) -> list[Detection]:
    """The objects of a shapes image. ``palette``: color name -> RGB to tell apart (default PALETTE). ``diamonds``:
    also tell diamonds (a shape the shipped model never saw) from triangles: both fill half their box, a
    triangle's widest row is its base, a diamond's its middle (off by default, so the shapes-test verdicts stay
    what they are)."""
    names, colors = (_COLOR_NAMES, _PALETTE) if palette is None else (tuple(palette), np.asarray(list(palette.values()), np.float32))
    img = np.asarray(image, np.float32)[..., :3]
    h, w = img.shape[:2]
    k = RESOLUTION / w
    fg = np.linalg.norm(img - np.asarray(BACKGROUND, np.float32), axis=-1) > FOREGROUND_DISTANCE
    d2 = ((img[:, :, None, :] - colors) ** 2).sum(-1)
    nearest = np.argmin(d2, axis=-1)
    fg &= d2.min(-1) < PALETTE_DISTANCE**2
    found = []
    for ci, cname in enumerate(names):
        for comp in _components(fg & (nearest == ci)):
            if comp.size < MIN_AREA_FRACTION * h * w:
                continue
            ys, xs = np.divmod(comp, w)
            bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            fill = comp.size / (bw * bh)
            shape = "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"
            if diamonds and shape == "triangle" and 0.3 <= _widest_row_at(ys, xs) <= 0.7:
                shape = "diamond"
            cx, cy = (xs.min() + xs.max() + 1) / 2 * k, (ys.min() + ys.max() + 1) / 2 * k
            size = "large" if max(bw, bh) * k / 2 > _SIZE_SPLIT else "small"
            position = min(ANCHORS, key=lambda a: (ANCHORS[a][0] - cx) ** 2 + (ANCHORS[a][1] - cy) ** 2)
            found.append(Detection(shape, cname, size, position, (float(cx), float(cy)), int(comp.size), float(fill)))
    return found
