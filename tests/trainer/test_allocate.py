"""Bit allocation: sensitivity order, the semantic refinement, and the bisection hitting its target."""

import math

import numpy as np
import pytest

from bf.errors import BfError
from bf.format import Grid
from bf.format.summary import paper_average_bits
from bf.trainer.allocate import ANALYSIS_FORMAT, ANALYSIS_VERSION, Allocator, allocate, analysis_layers


def synthetic_analysis(n_layers=256, seed=0, drop3=None):
    """SD-like: a few large layers, many small; MSE falls ~4x per extra bit, with a per-layer sensitivity."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(n_layers):
        out = int(rng.choice([32, 64, 128, 320, 640]))
        shape = [out, out, 3, 3] if i % 3 == 0 else [out, out]
        params = math.prod(shape)
        base = float(rng.lognormal(0, 1.5))
        bits = {str(b): {"mse": base * 4.0 ** (-b), "semantic_drop": float(rng.random()) if drop3 is None else drop3[i]} for b in (1, 2, 3)}
        layers[f"blocks.{i}"] = {"shape": shape, "params": params, "bits": bits}
    return {
        "format": ANALYSIS_FORMAT,
        "version": ANALYSIS_VERSION,
        "layers": layers,
        "accounting": {
            "edge_layers": {"conv_in": [32, 4, 3, 3], "conv_out": [4, 32, 3, 3]},
            "time_weight_params": 50_000,
            "time_features": 50 * 2000,
        },
    }


@pytest.mark.parametrize("target", [1.85, 1.99, 2.5, 3.2])
def test_bisection_hits_the_target_within_a_hundredth_and_never_over(target):
    recipe = allocate(synthetic_analysis(), target)
    assert recipe["avg_bits"] <= target + 1e-12
    assert target - recipe["avg_bits"] < 0.01
    assert set(recipe["layers"].values()) <= set(range(1, 8))
    # the average is recomputed independently from the recipe
    an = synthetic_analysis()
    rows = [(an["layers"][n]["params"], Grid(b).levels) for n, b in recipe["layers"].items()]
    rows += [(math.prod(s), Grid(8).levels) for s in an["accounting"]["edge_layers"].values()]
    assert paper_average_bits(rows, 50_000, 50 * 2000) == pytest.approx(recipe["avg_bits"], abs=1e-12)
    assert sum(h["params"] for h in recipe["histogram"]) == sum(ly["params"] for ly in an["layers"].values())


def test_more_bits_for_more_sensitive_layers():
    an = synthetic_analysis(drop3=[0.0] * 256)  # no semantic refinement
    layers, acc = analysis_layers(an)
    alloc = Allocator(layers, acc)
    _, bits = alloc.solve(1.99)
    sens = alloc.sens[:, 0]
    # among layers of one size, a larger 1-bit sensitivity never gets fewer bits
    params = np.array([ly.params for ly in layers])
    for p in np.unique(params):
        idx = np.where(params == p)[0]
        order = idx[np.argsort(sens[idx])]
        assert np.all(np.diff(bits[order]) >= 0)
    # and a higher target never takes bits away
    _, more = alloc.solve(2.6)
    assert np.all(more >= bits) and more.sum() > bits.sum()


def test_semantic_refinement_adds_one_two_three_bits_above_the_percentiles():
    drop = np.linspace(0, 1, 256).tolist()
    an = synthetic_analysis(drop3=drop)
    layers, acc = analysis_layers(an)
    bonus = Allocator(layers, acc).bonus
    d = np.array(drop)
    assert (bonus == 3).sum() == (d > np.percentile(d, 98)).sum() == 6
    assert (bonus >= 2).sum() == (d > np.percentile(d, 95)).sum() == 13
    assert (bonus >= 1).sum() == (d > np.percentile(d, 90)).sum() == 26
    # ties at zero get nothing
    tied = Allocator(*analysis_layers(synthetic_analysis(drop3=[0.0] * 250 + [1.0] * 6))).bonus
    assert (tied[:250] == 0).all() and (tied[250:] == 3).all()


def test_eta_favours_large_layers_at_low_bits():
    an = synthetic_analysis(drop3=[0.0] * 256)
    share = {}
    for eta in (0.0, 0.5):
        r = allocate(an, 1.99, eta=eta)
        one = [n for n, b in r["layers"].items() if b == 1]
        share[eta] = np.mean([an["layers"][n]["params"] for n in one])
    assert share[0.5] > share[0.0]  # N^-eta lowers big layers' sensitivity


def test_bad_analyses_are_refused_with_a_reason():
    an = synthetic_analysis()
    del an["layers"]["blocks.3"]["bits"]["3"]
    with pytest.raises(BfError, match=r"not analysed at 1, 2 and 3 bits.*--resume"):
        allocate(an, 1.99)
    with pytest.raises(BfError, match="not a bf analysis"):
        allocate({"format": "something"}, 1.99)
    with pytest.raises(BfError, match="lowest average"):
        allocate(synthetic_analysis(), 1.0)
    an = synthetic_analysis()
    del an["accounting"]
    with pytest.raises(BfError, match="accounting"):
        allocate(an, 1.99)
