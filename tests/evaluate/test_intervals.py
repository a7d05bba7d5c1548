"""Bootstrap intervals over prompts (bf.evaluate.intervals): the resampling as specified, and pairing."""

import math

import numpy as np
import pytest

from bf.evaluate.intervals import RESAMPLES, SEED, mean_ci, paired_difference, psnr_ci


def test_the_interval_is_the_percentiles_of_prompt_resampled_means():
    rng = np.random.default_rng(3)
    values = (rng.random((40, 3)) < 0.7).astype(float)
    idx = np.random.default_rng(SEED).integers(0, 40, size=(RESAMPLES, 40))  # prompts with replacement, seeds kept together
    means = np.array([values[row].mean() for row in idx])
    assert mean_ci(values) == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    lo, hi = mean_ci(values)
    assert lo < values.mean() < hi and mean_ci(values) == mean_ci(values)  # fixed resamples: the same interval


def test_a_constant_has_no_spread_and_more_prompts_narrow_the_interval():
    assert mean_ci(np.ones((10, 2))) == [1.0, 1.0]
    rng = np.random.default_rng(0)
    small, large = ((rng.random((n, 2)) < 0.8).astype(float) for n in (30, 480))
    assert np.diff(mean_ci(large))[0] < 0.5 * np.diff(mean_ci(small))[0]


def test_psnr_interval_of_a_constant_error_is_that_psnr():
    lo, hi = psnr_ci(np.full((5, 2), 1e-3))
    assert lo == pytest.approx(30.0) and hi == pytest.approx(30.0)
    assert psnr_ci(np.zeros((3, 1))) == [math.inf, math.inf]


def test_pairing_separates_what_independent_intervals_cannot():
    """Half the prompts always succeed, half always fail; model b also gets 10 of the failing prompts right.
    Each model's own interval is wide (which prompts were drawn dominates) and they overlap; the paired
    difference, on the same resampled prompts, is 0.1 with an interval that excludes 0."""
    a = np.repeat((np.arange(100) < 50).astype(float)[:, None], 4, axis=1)
    b = a.copy()
    b[50:60] = 1.0
    a_hi, b_lo = mean_ci(a)[1], mean_ci(b)[0]
    assert b_lo < a_hi  # unpaired: the intervals overlap
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(0.1) and 0 < d["ci95"][0] < 0.1 < d["ci95"][1]
    assert paired_difference(a, a) == {"difference": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_difference(a, b[:10])
