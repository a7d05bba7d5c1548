"""Fréchet distance to rendered ground truth (bf.evaluate.frechet): zero for equal sets, and it counts what the detector does not."""

import numpy as np
import pytest

from bf.evaluate.frechet import fd_to_rendered, features, frechet_distance, rendered_truth
from bf.shapes.detect import detect
from bf.shapes.judge import judge
from bf.shapes.scenes import eval_scenes


def test_equal_sets_are_at_zero_and_the_distance_is_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(1.0, 2.0, size=(200, 8))
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a))
    # two Gaussians with known moments: |mu|^2 + sum (sigma_a - sigma_b)^2 per dimension, up to sampling
    big_a, big_b = rng.normal(size=(20000, 3)), rng.normal(1.0, 2.0, size=(20000, 3))
    assert frechet_distance(big_a, big_b) == pytest.approx(3 * 1.0 + 3 * (2.0 - 1.0) ** 2, rel=0.05)


def test_features_are_fixed_and_refuse_odd_sizes():
    scenes = eval_scenes("two")[:4]
    imgs = rendered_truth(scenes, 2, 64)
    f = features(imgs)
    assert f.shape == (8, 67) and np.array_equal(f, features(imgs))
    with pytest.raises(ValueError, match="divisible by 4"):
        features(np.zeros((2, 30, 30, 3), dtype=np.uint8))


def test_noise_and_blur_the_detector_passes_still_count():
    """Rendered scenes with mild noise and a blur: the detector still judges them right, while their distance
    to the ground truth is many times that of another clean draw (which sits near the documented 1)."""
    scenes = [sc for split in ("single", "two") for sc in eval_scenes(split)]
    other = rendered_truth(scenes, 2, 64, seed=1)
    x = other.astype(np.float64)
    x = (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2) + np.roll(x, (1, 1), axis=(1, 2))) / 4  # a 2x2 blur
    damaged = np.clip(x + np.random.default_rng(0).normal(0, 3, size=x.shape), 0, 255).astype(np.uint8)
    right = [judge(sc, detect(img))["overall"] for sc, img in zip([s for s in scenes for _ in range(2)], damaged, strict=True)]
    assert np.mean(right) >= 0.95
    clean = fd_to_rendered(other, scenes)
    assert 0.5 < clean < 1.5
    assert fd_to_rendered(damaged, scenes) > 5 * clean
