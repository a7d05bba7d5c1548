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


def test_a_whole_split_varies_with_its_seeds_alone():
    """Prompts that are every scene of their split: a normal interval from each prompt's seed variance, its success
    rate pulled toward 1/2 by half a success, so a prompt that failed on both seeds still counts; narrower than the
    prompt bootstrap, which counts which prompts were drawn. One seed falls back to the bootstrap; a difference adds
    both models' variances; other values use the unbiased seed variance."""
    from bf.evaluate.intervals import Z95, mean_variance

    rng = np.random.default_rng(1)
    values = np.vstack([np.ones((10, 4)), np.zeros((10, 4)), (rng.random((10, 4)) < 0.5).astype(float)])
    p = (values.sum(axis=1) + 0.5) / 5
    var = (p * (1 - p)).sum() / 4 / 30**2
    assert mean_variance(values, whole=True) == pytest.approx(var)
    lo, hi = mean_ci(values, whole=True)
    assert (lo, hi) == pytest.approx((values.mean() - Z95 * var**0.5, values.mean() + Z95 * var**0.5))
    assert hi - lo < 0.6 * np.diff(mean_ci(values))[0]
    assert mean_ci(values[:, :1], whole=True) == mean_ci(values[:, :1])
    lo, hi = mean_ci(np.ones((30, 2)), whole=True)  # every seed right: still an interval, inside [0, 1]
    assert 0.9 < lo < 1.0 and hi == 1.0
    a, b = np.zeros((30, 2)), np.zeros((30, 2))
    b[:2] = 1.0  # two prompts right on both seeds: not certain, an interval around 4/60
    d = paired_difference(a, b, whole=True)
    assert d["difference"] == pytest.approx(4 / 60) and d["ci95"][0] < 0.02 and d["ci95"][1] > 0.1
    mse = rng.random((30, 3))
    assert mean_variance(mse, whole=True) == pytest.approx(mse.var(axis=1, ddof=1).sum() / 3 / 30**2)


def test_splits_combine_by_their_images():
    from bf.evaluate.intervals import Z95, combined_ci, combined_difference, difference_variance, mean_variance

    rng = np.random.default_rng(2)
    a, b = (rng.random((30, 2)) < 0.8).astype(float), (rng.random((10, 2)) < 0.4).astype(float)
    lo, hi = combined_ci([(a, False), (b, True)])
    mean = (a.sum() + b.sum()) / 80
    half = Z95 * ((60 / 80) ** 2 * mean_variance(a) + (20 / 80) ** 2 * mean_variance(b, True)) ** 0.5
    assert (lo, hi) == pytest.approx((mean - half, mean + half))
    a2, b2 = 1 - a, 1 - b
    d = combined_difference([(a, a2, False), (b, b2, True)])
    half = Z95 * ((60 / 80) ** 2 * difference_variance(a, a2) + (20 / 80) ** 2 * difference_variance(b, b2, True)) ** 0.5
    assert d["difference"] == pytest.approx(((a2 - a).sum() + (b2 - b).sum()) / 80)
    assert d["ci95"] == pytest.approx([max(d["difference"] - half, -1), min(d["difference"] + half, 1)])


def test_every_prompt_of_a_split_makes_it_whole():
    from bf.evaluate.evaluation import prompt_sets, whole_split
    from bf.shapes.scenes import SPACE_SIZE, caption

    whole = {n: {ps.split: whole_split(ps.split, ps.scenes) for ps in prompt_sets(f"shapes-test:{n}")} for n in (30, 150, 384, 840)}
    assert whole[30] == {"single": False, "two": False, "heldout": True, "heldout-two": False}
    assert whole[150] == {"single": True, "two": False, "heldout": True, "heldout-two": False}
    assert whole[384] == {"single": True, "two": False, "heldout": True, "heldout-two": True}
    assert all(whole[840].values())
    two = next(ps for ps in prompt_sets("shapes-test:840") if ps.split == "two")
    assert len({caption(sc) for sc in two.scenes}) == SPACE_SIZE["two"] == 840
    assert not whole_split("two", two.scenes[:-1])  # one caption short
    # the held-out two-object captions are not "two" captions, however many there are
    held = next(ps for ps in prompt_sets("shapes-test:840") if ps.split == "heldout-two")
    assert not whole_split("two", held.scenes) and not whole_split("heldout-two", two.scenes)
    assert not whole_split("two", [*two.scenes[:-1], None])  # a prompt that is no shapes caption
