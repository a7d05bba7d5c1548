import itertools

import numpy as np
import pytest
import torch

from bf.format import Grid
from bf.trainer.quantizer import (
    alternating_scale,
    dequantize,
    fake_quantize,
    lsq_grad_scale,
    minmax_scale,
    quant_error,
    quantize_levels,
)


def _weights(kind: str, shape=(16, 288), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g) * 0.05
    if kind == "student_t":  # heavy tails: df=2
        z = torch.randn(shape, generator=g)
        chi = torch.randn((2, *shape), generator=g).pow(2).sum(0)
        return 0.02 * z / torch.sqrt(chi / 2)
    if kind == "laplace":
        u = torch.rand(shape, generator=g) - 0.5
        return -0.03 * torch.sign(u) * torch.log1p(-2 * u.abs())
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "student_t", "laplace"])
@pytest.mark.parametrize("grid", [Grid(b, k) for b in (1, 2, 3, 4) for k in ("balanced", "plain")], ids=str)
def test_alternating_objective_never_increases_and_beats_minmax(kind, grid):
    w = _weights(kind)
    history: list[float] = []
    s = alternating_scale(w, grid, iters=10, history=history)
    assert len(history) == 11
    assert history[0] == pytest.approx(float(quant_error(w, minmax_scale(w, grid), grid).sum()))
    for before, after in itertools.pairwise(history):
        assert after <= before * (1 + 1e-6)
    assert history[-1] < 0.98 * history[0]  # clearly below min-max, not just equal
    assert float(quant_error(w, s, grid).sum()) == pytest.approx(history[-1])


def test_minmax_covers_the_range_without_clipping():
    w = _weights("normal")
    for grid in (Grid(2), Grid(3, "plain"), Grid(1), Grid(8)):
        s = minmax_scale(w, grid)
        x = w.double() / s.double()[:, None]
        for o in range(w.shape[0]):
            hi, lo = float(x[o].max()), float(x[o].min())
            assert hi <= grid.qmax + 1e-6 and lo >= grid.qmin - 1e-6, (grid, o)
            # the smallest such scale: one end of the row sits exactly on the end of the grid
            assert abs(hi - grid.qmax) <= 1e-6 or abs(lo - grid.qmin) <= 1e-6, (grid, o, hi, lo)
    bal = Grid(2)
    torch.testing.assert_close(minmax_scale(w, bal), w.abs().amax(1) / bal.qmax)


def test_all_zero_rows_are_exact():
    w = torch.zeros(3, 10)
    w[1] = torch.linspace(-1, 1, 10)
    for grid in (Grid(1), Grid(2, "plain")):
        for s in (minmax_scale(w, grid), alternating_scale(w, grid)):
            assert torch.all(s > 0)
            assert s[0].item() == 1.0 and s[2].item() == 1.0
            q = quantize_levels(w, s, grid)
            assert torch.all(q[0] == 0) and torch.all(q[2] == 0)
            wq = dequantize(q, s)
            assert torch.all(wq[0] == 0) and torch.all(wq[2] == 0)
            assert torch.all(fake_quantize(w, s, grid)[[0, 2]] == 0)


def test_minmax_plain_one_bit_covers_only_the_negative_side():
    """Plain 1-bit has levels -1 and 0: positive weights cannot be covered and round to 0."""
    w = torch.tensor([[-0.5, 0.25, 1.0]])
    s = minmax_scale(w, Grid(1, "plain"))
    assert s.item() == 0.5
    assert quantize_levels(w, s, Grid(1, "plain")).tolist() == [[-1.0, 0.0, 0.0]]


def test_rounding_is_half_to_even_like_numpy():
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 0.49]])
    q = quantize_levels(w, torch.ones(1), Grid(4))
    np.testing.assert_array_equal(q.numpy(), np.clip(np.round(w.numpy()), -8, 8))


def _surrogate(w, s, grid, gs):
    """LSQ's forward, round(clip(w/s)) * s, with detach tricks; autograd gives its gradients."""
    s_scaled = (s - s * gs).detach() + s * gs
    x = torch.clamp(w / s_scaled[:, None], grid.qmin, grid.qmax)
    x_round = (x.round() - x).detach() + x
    return x_round * s_scaled[:, None]


@pytest.mark.parametrize("grid", [Grid(1), Grid(2), Grid(4, "plain")], ids=str)
def test_fake_quant_gradients_match_lsq(grid):
    w = _weights("laplace", (8, 50), seed=3).double()
    s = minmax_scale(w, grid).double() * 0.6  # some weights fall outside the clip range
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gs = lsq_grad_scale(w, grid)

    w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    out = fake_quantize(w1, s1, grid)
    (out * g).sum().backward()
    w2, s2 = w.clone().requires_grad_(), s.clone().requires_grad_()
    ref = _surrogate(w2, s2, grid, gs)
    (ref * g).sum().backward()

    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w1.grad, w2.grad)
    torch.testing.assert_close(s1.grad, s2.grad)
    x = w / s[:, None]
    outside = (x < grid.qmin) | (x > grid.qmax)
    assert outside.any()  # the test must exercise the clipped branch
    assert torch.all(w1.grad[outside] == 0)
    torch.testing.assert_close(w1.grad[~outside], g[~outside])


def test_fake_quant_accepts_column_scales():
    """A scale of shape (O, 1) works like (O,) and gets its gradient in its own shape."""
    grid = Grid(2)
    w = _weights("laplace", (8, 3, 2, 2), seed=4)
    s = minmax_scale(w, grid) * 0.7
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for scale in (s.clone(), s.clone()[:, None]):
        scale.requires_grad_()
        out = fake_quantize(w, scale, grid)
        (out * g).sum().backward()
        assert scale.grad.shape == scale.shape
        grads.append((out.detach(), scale.grad.reshape(-1)))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(quantize_levels(w, s[:, None], grid), quantize_levels(w, s, grid))
    torch.testing.assert_close(alternating_scale(w, grid, s0=s[:, None]), alternating_scale(w, grid, s0=s))
    with pytest.raises(ValueError, match="scales"):
        fake_quantize(w, s[:4], grid)


def test_fake_quant_forward_equals_dequantized_levels():
    w = _weights("normal", (4, 30))
    grid = Grid(3)
    s = alternating_scale(w, grid)
    torch.testing.assert_close(fake_quantize(w, s, grid), quantize_levels(w, s, grid) * s[:, None])


def test_lsq_grad_scale_value():
    assert lsq_grad_scale(torch.zeros(4, 100), Grid(2)) == pytest.approx(1 / np.sqrt(100 * 2))
    assert lsq_grad_scale(torch.zeros(4, 9), Grid(1, "plain")) == pytest.approx(1 / 3)


def test_qat_with_learned_scales_reduces_the_loss():
    """A 2-bit linear layer trained through fake-quant fits a target better than its init."""
    torch.manual_seed(0)
    grid = Grid(2)
    teacher = torch.randn(16, 32) * 0.1
    x = torch.randn(256, 32)
    y = x @ teacher.T
    w = (teacher + 0.05 * torch.randn_like(teacher)).requires_grad_()
    s = alternating_scale(w.detach(), grid).requires_grad_()
    opt = torch.optim.Adam([w, s], lr=3e-3)

    def loss():
        return ((x @ fake_quantize(w, s, grid).T - y) ** 2).mean()

    start = float(loss().detach())
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.5 * start
