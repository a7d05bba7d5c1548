"""95% confidence intervals of evaluation figures, by bootstrap over prompts.

An evaluation scores P prompts x S seeds. The images of one prompt are not independent draws (the
prompt decides much of whether they succeed), so the bootstrap resamples prompts with replacement
and keeps all of a prompt's seeds: the interval reflects which prompts were chosen as well as the
sampling noise of the seeds. Two models evaluated on the same prompts and seeds are compared
*paired*: the same resampled prompts for both, so what they share (an easy or hard prompt) cancels
in the difference. Percentile intervals from a fixed number of resamples with a fixed seed: the same
inputs give the same interval.
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


def mean_ci(values: np.ndarray) -> list[float]:
    """Interval of the mean of ``values`` (prompts x seeds, e.g. 0/1 verdicts)."""
    values = np.asarray(values, dtype=np.float64)
    idx = prompt_resamples(len(values))
    return _interval(values[idx].mean(axis=(1, 2)))


def psnr_ci(mse: np.ndarray) -> list[float]:
    """Interval of the PSNR of the mean pixel MSE (prompts x seeds; images in [0, 1]), as ``fidelity`` computes it:
    the MSE's interval mapped through PSNR = 10 log10(1 / MSE), which decreases, so the ends swap (inf at MSE 0)."""
    mse = np.asarray(mse, dtype=np.float64)
    lo, hi = _interval(mse[prompt_resamples(len(mse))].mean(axis=(1, 2)))
    return [_psnr(hi), _psnr(lo)]


def _psnr(mse: float) -> float:
    return math.inf if mse <= 0 else 10 * math.log10(1 / mse)


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """``b`` minus ``a`` (two models' per-image values on the same prompts x seeds): the difference of
    the means and its paired interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same prompts and seeds, got {a.shape} and {b.shape}")
    d = b - a
    return {"difference": float(d.mean()), "ci95": _interval(d[prompt_resamples(len(d))].mean(axis=(1, 2)))}
