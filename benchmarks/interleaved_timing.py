"""Step times of several configurations measured in interleaved rounds, and their ratios with 95% intervals.

Timed one after another, two configurations of one run differ by what the GPU did between them (clocks,
temperature, power): on an H200 the same compiled step measured up to 3% apart within a run, more than the
differences sought. Interleaving removes that drift from the comparison: every round times each configuration
(``iters`` replays, after ``warmup`` untimed) in a fresh random order, and a ratio of two configurations is taken
round by round, where both saw the same GPU. The figure reported is the median of those per-round ratios, with a
95% percentile interval from resampling the rounds (fixed resamples and seed: the same rounds give the same interval).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable

import numpy as np

RESAMPLES = 2000
SEED = 20261201


def cuda_round_ms(call: Callable[[], object], iters: int, warmup: int) -> float:
    """The median of ``iters`` timed calls of ``call`` (CUDA events), after ``warmup`` untimed ones."""
    from bf.runtime.torch_graph import cuda_time_ms

    return statistics.median(cuda_time_ms(call, iters, warmup))


def interleaved_rounds(steps: dict[str, Callable[[], object]], rounds: int, iters: int, warmup: int = 3, seed: int = SEED,
                       timer: Callable[[Callable[[], object], int, int], float] = cuda_round_ms) -> dict[str, list[float]]:  # fmt: skip
    """Each step's median ms in each of ``rounds`` rounds; a round times every step once, in a shuffled order."""
    if rounds < 2:
        raise ValueError(f"rounds={rounds}: interleaving needs 2 or more rounds for an interval")
    order, rng = list(steps), random.Random(seed)
    per_round: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            per_round[name].append(timer(steps[name], iters, warmup))
    return per_round


def paired_ratio(a: list[float], b: list[float], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """``a`` over ``b`` (per-round times of two configurations from the same rounds): the median of the per-round
    ratios and its 95% bootstrap interval over rounds."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired rounds expected, 2 or more: got {len(a)} and {len(b)}")
    ratios = np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(ratios), size=(resamples, len(ratios)))
    lo, hi = np.percentile(np.median(ratios[picks], axis=1), [2.5, 97.5])
    return {"median": float(np.median(ratios)), "ci95": [float(lo), float(hi)], "rounds": len(ratios)}


def interleaved_summary(per_round: dict[str, list[float]], baselines: list[str]) -> dict:
    """The fastest of ``baselines`` by median round time, every configuration's median ms, and each one's paired
    ratio to that baseline."""
    missing = [n for n in baselines if n not in per_round]
    if not baselines or missing:
        raise ValueError(f"baselines not timed: {', '.join(missing) or 'none given'}")
    medians = {n: statistics.median(t) for n, t in per_round.items()}
    best = min(baselines, key=medians.__getitem__)
    return {"best_baseline": best, "median_ms": medians,
            "vs_best_baseline": {n: paired_ratio(t, per_round[best]) for n, t in per_round.items()}}  # fmt: skip
