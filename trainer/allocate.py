"""Mixed-precision bit allocation from a per-layer analysis (docs/RECIPE.md section 3).

Sensitivity ``S(i, b) = MSE(i, b) * N_i^-eta``; a layer gets the smallest width in
{1, 2, 3} whose sensitivity is under the threshold ``S_o``, else 4. Layers whose 3-bit
semantic drop is above the 90th / 95th / 98th percentile get +1 / +2 / +3 bits. The
threshold is found by bisection so the average (the paper's count, with the cached time
features) is as close to the target as the layers allow without going over it.

NumPy only: the analysis JSON carries everything the count needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bf.errors import BfError
from bf.format import EDGE_BITS, Grid, QuantizedLayer
from bf.format.summary import paper_average_bits
from bf.trainer.recipe import make_recipe

ANALYSIS_FORMAT = "bf.analysis"
ANALYSIS_VERSION = 1
ANALYSED_BITS = (1, 2, 3)
FALLBACK_BITS = 4  # a layer no analysed width satisfies
REFINE_PERCENTILES = (90.0, 95.0, 98.0)  # +1, +2, +3 bits above each
DEFAULT_ETA = 0.3


@dataclass(frozen=True)
class LayerStats:
    name: str
    shape: tuple[int, ...]
    params: int
    mse: dict[int, float]  # bit width -> pixel MSE against the FP model
    semantic_drop: dict[int, float]  # bit width -> accuracy (or CLIP) drop


@dataclass(frozen=True)
class Accounting:
    """What the paper's count needs besides the analysed layers."""

    edge_layers: dict[str, tuple[int, ...]]  # conv_in / conv_out: 8 bits
    time_weight_params: int  # time-embedding MLP and time projections (in N_w, not quantized)
    time_features: int  # cached time features (table rows x width), 16 bits each


def load_analysis(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BfError(f"{path}: no such analysis file; make one with bf analyze") from None
    except (OSError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BfError(f"{path}: not a readable analysis JSON ({detail})") from None


def analysis_layers(analysis: dict, source: str = "analysis") -> tuple[list[LayerStats], Accounting]:
    """Complete layers of an analysis JSON, checked; an unfinished analysis is refused."""
    if not isinstance(analysis, dict) or analysis.get("format") != ANALYSIS_FORMAT:
        raise BfError(f'{source}: not a bf analysis (expected "format": "{ANALYSIS_FORMAT}"); make one with bf analyze')
    if analysis.get("version") != ANALYSIS_VERSION:
        raise BfError(f"{source}: analysis version {analysis.get('version')!r} is not supported (this bf reads {ANALYSIS_VERSION})")
    layers = []
    missing = []
    for name, rec in analysis.get("layers", {}).items():
        res = rec.get("bits", {})
        if not all(str(b) in res for b in ANALYSED_BITS):
            missing.append(name)
            continue
        mse = {b: float(res[str(b)]["mse"]) for b in ANALYSED_BITS}
        drop = {b: float(res[str(b)].get("semantic_drop", 0.0)) for b in ANALYSED_BITS}
        if not all(math.isfinite(v) and v >= 0 for v in mse.values()):
            raise BfError(f"{source}: layer {name} has a negative or non-finite MSE; rerun bf analyze for it")
        layers.append(LayerStats(name, tuple(rec["shape"]), int(rec["params"]), mse, drop))
    missing += [c for c in analysis.get("candidates", []) if c not in analysis.get("layers", {})]
    if missing:
        raise BfError(
            f"{source}: {len(missing)} layer(s) not analysed at 1, 2 and 3 bits yet (e.g. {missing[0]}); finish with bf analyze --resume"
        )
    if not layers:
        raise BfError(f"{source}: no analysed layers")
    acc = analysis.get("accounting", {})
    try:
        accounting = Accounting(
            {k: tuple(v) for k, v in acc["edge_layers"].items()}, int(acc["time_weight_params"]), int(acc["time_features"])
        )
    except (KeyError, TypeError, ValueError):
        raise BfError(f'{source}: "accounting" (edge_layers, time_weight_params, time_features) is missing or malformed') from None
    return layers, accounting


def _prod(shape) -> int:
    return int(np.prod(shape))


def semantic_bonus(layers: list[LayerStats]) -> np.ndarray:
    """+1/+2/+3 bits for layers whose 3-bit semantic drop is above the 90th/95th/98th percentile.

    Strictly above: when most drops are equal (often 0 on a small prompt set), the
    tied layers get nothing.
    """
    drop = np.array([ly.semantic_drop[3] for ly in layers])
    return sum((drop > np.percentile(drop, p)).astype(int) for p in REFINE_PERCENTILES)


class Allocator:
    """Bit widths as a function of the threshold, and the average they give."""

    def __init__(self, layers: list[LayerStats], accounting: Accounting, eta: float = DEFAULT_ETA, grid: str = "balanced"):
        self.layers, self.accounting, self.eta, self.grid = layers, accounting, eta, grid
        params = np.array([ly.params for ly in layers], dtype=np.float64)
        self.sens = np.array([[ly.mse[b] for b in ANALYSED_BITS] for ly in layers]) * params[:, None] ** -eta
        self.bonus = semantic_bonus(layers)
        self.edge = [(_prod(s), Grid(EDGE_BITS, grid).levels) for s in accounting.edge_layers.values()]

    def bits(self, threshold: float) -> np.ndarray:
        below = self.sens < threshold
        base = np.where(below.any(1), np.array(ANALYSED_BITS)[below.argmax(1)], FALLBACK_BITS)
        return np.minimum(base + self.bonus, 8)

    def average(self, bits: np.ndarray) -> float:
        rows = [(ly.params, Grid(int(b), self.grid).levels) for ly, b in zip(self.layers, bits, strict=True)] + self.edge
        return paper_average_bits(rows, self.accounting.time_weight_params, self.accounting.time_features)

    def stored_bits(self, bits: np.ndarray) -> float:
        """Real bits per quantized weight on disk: packed codes and fp32 scales, edge layers included."""
        shapes = [(ly.shape, int(b)) for ly, b in zip(self.layers, bits, strict=True)]
        shapes += [(s, EDGE_BITS) for s in self.accounting.edge_layers.values()]
        total = sum(QuantizedLayer.stored_bytes_for(shape, Grid(b, self.grid)) for shape, b in shapes)
        return 8 * total / sum(_prod(shape) for shape, _ in shapes)

    def solve(self, target: float, iters: int = 200) -> tuple[float, np.ndarray]:
        """Bits whose average is at most ``target`` and as close to it as the layers allow.

        Bisection on log S_o finds the smallest threshold under the target. The threshold
        moves in jumps (one large layer can be worth 0.03 bits), so the rest of the budget
        goes, in the order further lowering S_o would have given it, to the layers whose
        next width still fits.
        """
        lo_avg, hi_avg = self.average(self.bits(np.inf)), self.average(self.bits(0.0))
        if target < lo_avg:
            raise BfError(f"--target-bits {target}: the lowest average this model allows is {lo_avg:.3f} (1 bit + semantic refinement)")
        if target >= hi_avg:
            return 0.0, self.bits(0.0)
        pos = self.sens[self.sens > 0]
        lo, hi = math.log(pos.min()) - 1 if pos.size else -50.0, math.log(self.sens.max() + 1e-300) + 1
        for _ in range(iters):  # invariant: average(exp(hi)) <= target < average(exp(lo))
            mid = (lo + hi) / 2
            if self.average(self.bits(math.exp(mid))) <= target:
                hi = mid
            else:
                lo = mid
        threshold = math.exp(hi)
        bits = self.bits(threshold)
        base = bits - self.bonus
        order = [i for i in np.argsort(-self.sens[np.arange(len(bits)), np.minimum(base, 3) - 1]) if base[i] < FALLBACK_BITS]
        for i in order:
            trial = bits.copy()
            trial[i] = min(trial[i] + 1, 8)
            if self.average(trial) <= target:
                bits = trial
        return threshold, bits


def allocate(analysis: dict, target_bits: float, eta: float = DEFAULT_ETA, grid: str = "balanced", source: str = "analysis") -> dict:
    """A recipe hitting ``target_bits`` (paper's count), with the histogram and both averages."""
    layers, accounting = analysis_layers(analysis, source)
    alloc = Allocator(layers, accounting, eta, grid)
    threshold, bits = alloc.solve(target_bits)
    hist: dict[int, list[int]] = {}
    for ly, b in zip(layers, bits, strict=True):
        h = hist.setdefault(int(b), [0, 0])
        h[0] += 1
        h[1] += ly.params
    n = sum(ly.params for ly in layers)
    histogram = [{"bits": b, "layers": c, "params": p, "share": p / n} for b, (c, p) in sorted(hist.items())]
    return make_recipe(
        grid,
        {ly.name: int(b) for ly, b in zip(layers, bits, strict=True)},
        kind="allocated",
        target_bits=target_bits,
        avg_bits=alloc.average(bits),
        stored_bits_per_weight=alloc.stored_bits(bits),
        eta=eta,
        threshold=threshold,
        semantic_refined_layers=int((alloc.bonus > 0).sum()),
        histogram=histogram,
        model=analysis.get("model"),
    )
