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
normal, from each prompt's variance over its seeds (unbiased, so 2 or more seeds; with one seed the
prompt bootstrap, which overstates it, is used).
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


def mean_variance(values: np.ndarray, whole: bool = False) -> float:
    """Variance of the mean of ``values`` (prompts x seeds): over seeds alone for a ``whole`` split (2+ seeds), else
    over the prompt resamples."""
    values = np.asarray(values, dtype=np.float64)
    if whole and _seeds_only(values):
        return float(values.var(axis=1, ddof=1).sum() / values.shape[1] / values.shape[0] ** 2)
    return float(values[prompt_resamples(len(values))].mean(axis=(1, 2)).var())


def mean_ci(values: np.ndarray, whole: bool = False) -> list[float]:
    """Interval of the mean of ``values`` (prompts x seeds, e.g. 0/1 verdicts); ``whole``: the prompts are every
    scene of their split (see above)."""
    values = np.asarray(values, dtype=np.float64)
    if whole and _seeds_only(values):
        return _normal(values.mean(), mean_variance(values, whole), values.min(), values.max())
    idx = prompt_resamples(len(values))
    return _interval(values[idx].mean(axis=(1, 2)))


def _normal(mean: float, variance: float, lowest: float, highest: float) -> list[float]:
    half = Z95 * math.sqrt(variance)
    return [float(max(mean - half, lowest)), float(min(mean + half, highest))]


def combined_ci(parts: list[tuple[np.ndarray, bool]]) -> list[float]:
    """Interval of the mean over every image of several splits (``(values, whole)`` each, prompts x seeds), each split
    varying independently by its own rule: a normal interval from the splits' variances weighted by their images."""
    n = sum(np.size(v) for v, _ in parts)
    mean = sum(float(np.sum(v)) for v, _ in parts) / n
    variance = sum((np.size(v) / n) ** 2 * mean_variance(v, whole) for v, whole in parts)
    return _normal(mean, variance, min(float(np.min(v)) for v, _ in parts), max(float(np.max(v)) for v, _ in parts))


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
    return {"difference": float(d.mean()), "ci95": mean_ci(d, whole)}
