"""Rendering scenes to RGB images (anti-aliased by 4x supersampling)."""

from __future__ import annotations

import numpy as np

from bf.shapes.scenes import Scene, caption, sample_scene

RESOLUTION = 128
BACKGROUND = (232, 232, 232)
PALETTE = {
    "red": (214, 38, 38),
    "green": (34, 160, 64),
    "blue": (40, 84, 224),
    "yellow": (236, 196, 24),
    "purple": (136, 56, 192),
    "orange": (244, 124, 28),
}
HALF_EXTENT = {"small": 11.0, "large": 20.0}  # half the bounding box, at 128 px
ANCHORS = {"left": (34.0, 64.0), "right": (94.0, 64.0), "top": (64.0, 34.0), "bottom": (64.0, 94.0), "center": (64.0, 64.0)}
JITTER_POS, JITTER_SIZE = 4.0, 1.5
_SS = 4  # supersampling factor


def _coverage(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (n x n image)."""
    t = (np.arange(n * _SS) + 0.5) / _SS
    x, y = t[None, :], t[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":  # apex up, base at the bottom of the bounding box
        inside = (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    elif shape == "diamond":  # a new shape the shipped model never saw (bf.shapes.detect tells it when asked to)
        inside = np.abs(x - cx) + np.abs(y - cy) <= r
    else:
        raise ValueError(shape)
    return inside.reshape(n, _SS, n, _SS).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None, resolution: int = RESOLUTION, palette: dict | None = None) -> np.ndarray:
    """uint8 (H, W, 3). With ``rng``, positions and sizes are jittered slightly. ``palette``: color name -> RGB
    (default PALETTE; a larger one draws colors the shapes model was never trained on)."""
    k = resolution / RESOLUTION
    img = np.empty((resolution, resolution, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:
        cx, cy = ANCHORS[obj.position]
        r = HALF_EXTENT[obj.size if obj.size in HALF_EXTENT else "small"]
        if rng is not None:
            cx, cy = cx + rng.uniform(-JITTER_POS, JITTER_POS), cy + rng.uniform(-JITTER_POS, JITTER_POS)
            r += rng.uniform(-JITTER_SIZE, JITTER_SIZE)
        a = _coverage(obj.shape, cx * k, cy * k, r * k, resolution)[..., None]
        img = img * (1 - a) + np.asarray((palette or PALETTE)[obj.color], np.float32) * a
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def training_example(seed: int, index: int, p_two: float = 0.5) -> tuple[np.ndarray, str, Scene]:
    """Example ``index`` of the training set with ``seed``: deterministic, order-free."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, p_two=p_two)
    return render(scene, rng), caption(scene, rng), scene
