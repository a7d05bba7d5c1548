"""95% confidence intervals of evaluation figures, by bootstrap over prompts.

An evaluation scores P prompts x S seeds. The images of one prompt are not independent draws (the
prompt decides much of whether they succeed), so the bootstrap resamples prompts with replacement
and keeps all of a prompt's seeds: the interval reflects which prompts were chosen as well as the
sampling noise of the seeds. Two models evaluated on the same prompts and seeds are compared
*paired*: the same resampled prompts for both, so what they share (an easy or hard prompt) cancels
in the difference. Percentile intervals from a fixed number of resamples with a fixed seed: the same
inputs give the same interval.

A split whose prompts are every scene it has (``whole``: the held-out split's 30, or all 150 single
scenes) is no sample of prompts: what varies between runs is the seeds alone. Its interval is then
normal, from each prompt's variance over its seeds. For 0/1 verdicts that variance is p(1 - p) / seeds
with p the prompt's success rate pulled toward 1/2 by half a success ((k + 1/2) / (seeds + 1)), so a
prompt that failed on every seed still counts as uncertain; a difference of two models adds both
models' variances (their covariance, positive on shared seeds, is left out: the interval errs wide).
Other values use the unbiased sample variance. With one seed the prompt bootstrap is used.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
SEED = 20261130


def prompt_resamples(prompts: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, prompts) indices: prompts drawn with replacement."""
    return np.random.default_rng(seed).integers(0, prompts, size=(resamples, prompts))


def _interval(stats: np.ndarray) -> list[float]:
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


Z95 = 1.959963984540054  # the normal distribution's 97.5th percentile


def _seeds_only(values: np.ndarray) -> bool:
    return values.shape[1] >= 2


def _binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def _seed_variance(values: np.ndarray) -> float:
    """Variance of the mean of a whole split's values (prompts x seeds, 2+ seeds) from the seeds alone."""
    prompts, seeds = values.shape
    if _binary(values):
        p = (values.sum(axis=1) + 0.5) / (seeds + 1)
        per_prompt = p * (1 - p)
    else:
        per_prompt = values.var(axis=1, ddof=1)
    return float(per_prompt.sum() / seeds / prompts**2)


def mean_variance(values: np.ndarray, whole: bool = False) -> float:
    """Variance of the mean of ``values`` (prompts x seeds): over seeds alone for a ``whole`` split (2+ seeds), else
    over the prompt resamples."""
    values = np.asarray(values, dtype=np.float64)
    if whole and _seeds_only(values):
        return _seed_variance(values)
    return float(values[prompt_resamples(len(values))].mean(axis=(1, 2)).var())


def difference_variance(a: np.ndarray, b: np.ndarray, whole: bool = False) -> float:
    """Variance of the mean of ``b - a`` (paired, prompts x seeds): a whole split's 0/1 verdicts add both models'
    seed variances; otherwise that of the differences themselves."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if whole and _seeds_only(a) and _binary(a) and _binary(b):
        return _seed_variance(a) + _seed_variance(b)
    return mean_variance(b - a, whole)


def mean_ci(values: np.ndarray, whole: bool = False) -> list[float]:
    """Interval of the mean of ``values`` (prompts x seeds, e.g. 0/1 verdicts); ``whole``: the prompts are every
    scene of their split (see above)."""
    values = np.asarray(values, dtype=np.float64)
    if whole and _seeds_only(values):
        return _normal(values.mean(), mean_variance(values, whole), *_reach([values]))
    idx = prompt_resamples(len(values))
    return _interval(values[idx].mean(axis=(1, 2)))


def _normal(mean: float, variance: float, lowest: float, highest: float) -> list[float]:
    """The normal interval, cut to what a mean can reach (``_reach``)."""
    half = Z95 * math.sqrt(variance)
    return [float(max(mean - half, lowest)), float(min(mean + half, highest))]


def combined_ci(parts: list[tuple[np.ndarray, bool]]) -> list[float]:
    """Interval of the mean over every image of several splits (``(values, whole)`` each, prompts x seeds), each split
    varying independently by its own rule: a normal interval from the splits' variances weighted by their images."""
    n = sum(np.size(v) for v, _ in parts)
    mean = sum(float(np.sum(v)) for v, _ in parts) / n
    variance = sum((np.size(v) / n) ** 2 * mean_variance(v, whole) for v, whole in parts)
    return _normal(mean, variance, *_reach([v for v, _ in parts]))


def combined_difference(parts: list[tuple[np.ndarray, np.ndarray, bool]]) -> dict:
    """``b`` minus ``a`` over every image of several splits (``(a, b, whole)`` each, paired prompts x seeds): the
    difference of the means and its normal interval, the splits weighted by their images (see combined_ci)."""
    n = sum(np.size(a) for a, _, _ in parts)
    d = [np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64) for a, b, _ in parts]
    diff = sum(float(x.sum()) for x in d) / n
    variance = sum((np.size(a) / n) ** 2 * difference_variance(a, b, whole) for a, b, whole in parts)
    return {"difference": diff, "ci95": _normal(diff, variance, *_reach([a for a, _, _ in parts], difference=True))}


def _reach(values: list[np.ndarray], difference: bool = False) -> tuple[float, float]:
    """What a mean can reach: [0, 1] for 0/1 verdicts ([-1, 1] for differences of them), else anything."""
    if all(_binary(np.asarray(v)) for v in values):
        return (-1.0 if difference else 0.0), 1.0
    return -math.inf, math.inf


def psnr_ci(mse: np.ndarray, whole: bool = False) -> list[float]:
    """Interval of the PSNR of the mean pixel MSE (prompts x seeds; images in [0, 1]), as ``fidelity`` computes it:
    the MSE's interval mapped through PSNR = 10 log10(1 / MSE), which decreases, so the ends swap (inf at MSE 0)."""
    mse = np.asarray(mse, dtype=np.float64)
    lo, hi = mean_ci(mse, whole)
    return [_psnr(hi), _psnr(lo)]


def _psnr(mse: float) -> float:
    return math.inf if mse <= 0 else 10 * math.log10(1 / mse)


def paired_difference(a: np.ndarray, b: np.ndarray, whole: bool = False) -> dict:
    """``b`` minus ``a`` (two models' per-image values on the same prompts x seeds): the difference of
    the means and its paired interval (``whole``: as for mean_ci)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same prompts and seeds, got {a.shape} and {b.shape}")
    d = b - a
    if whole and _seeds_only(d):
        reach = _reach([a, b], difference=True)
        return {"difference": float(d.mean()), "ci95": _normal(d.mean(), difference_variance(a, b, whole), *reach)}
    return {"difference": float(d.mean()), "ci95": mean_ci(d)}
