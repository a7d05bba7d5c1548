import math

import pytest

from bf.format import Grid


@pytest.mark.parametrize("bits", range(1, 9))
def test_balanced_levels_are_symmetric(bits):
    g = Grid(bits, "balanced")
    assert g.qmin == -(2 ** (bits - 1)) and g.qmax == 2 ** (bits - 1)
    assert g.levels == 2**bits + 1
    assert g.paper_bits == pytest.approx(math.log2(2**bits + 1))


@pytest.mark.parametrize("bits", range(1, 9))
def test_plain_levels(bits):
    g = Grid(bits, "plain")
    assert (g.qmin, g.qmax, g.levels, g.paper_bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2**bits, bits)


def test_paper_counts():
    assert [round(Grid(b).paper_bits, 2) for b in (1, 2, 3, 4)] == [1.58, 2.32, 3.17, 4.09]
    assert list(range(Grid(1).qmin, Grid(1).qmax + 1)) == [-1, 0, 1]
    assert list(range(Grid(2).qmin, Grid(2).qmax + 1)) == [-2, -1, 0, 1, 2]


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0])
def test_invalid_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        Grid(bad)


def test_invalid_kind():
    with pytest.raises(ValueError, match="grid"):
        Grid(2, "uniform")


def test_json_round_trip():
    for g in (Grid(3), Grid(5, "plain")):
        assert Grid.from_json(g.to_json()) == g
