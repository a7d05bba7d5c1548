"""Per-output-channel uniform quantizer in torch: levels, scale init, fake-quant (docs/RECIPE.md sections 1-2).

Weights are viewed as rows (one per output channel). ``quantize_levels`` is the one
rounding rule used everywhere: ``clip(round_half_even(w / s), qmin, qmax)``.
"""

from __future__ import annotations

import math

import torch

from bf.format import Grid
from bf.trainer import fused_fake_quant

INIT_METHODS = ("alt", "minmax")
DEFAULT_ALT_ITERS = 10


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _bcast(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row scales of shape (O,) or (O, 1), shaped to broadcast against ``w``."""
    if s.dim() > 2 or s.numel() != w.shape[0]:
        raise ValueError(f"expected {w.shape[0]} scales of shape (O,) or (O, 1), got {tuple(s.shape)}")
    return s.reshape((-1,) + (1,) * (w.dim() - 1))


def quantize_levels(w: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer levels (as float) of ``w`` with per-row scales ``s``."""
    return torch.clamp(torch.round(w / _bcast(s, w)), grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q * _bcast(s, q)


def quant_error(w: torch.Tensor, s: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per-row squared error ``||s q(s) - w||^2`` in float64."""
    err = dequantize(quantize_levels(w, s, grid), s) - w
    return _rows(err).double().pow(2).sum(1)


def minmax_scale(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Smallest scale whose grid covers each row's [min, max] without clipping, where it can.

    Balanced grids (qmax = -qmin) give ``max|w| / qmax``. Plain 1-bit (levels -1, 0:
    qmax = 0) has no positive level, so no scale covers positive weights: the scale
    covers the minimum and positive weights round to 0. All-zero rows get scale 1,
    so their levels are exactly 0.
    """
    rows = _rows(w).float()
    hi = rows.amax(1).clamp_min(0)
    lo = rows.amin(1).clamp_max(0)
    s = lo / grid.qmin
    if grid.qmax > 0:
        s = torch.maximum(s, hi / grid.qmax)
    return torch.where(s > 0, s, torch.ones_like(s))


def alternating_scale(
    w: torch.Tensor,
    grid: Grid,
    iters: int = DEFAULT_ALT_ITERS,
    s0: torch.Tensor | None = None,
    history: list[float] | None = None,
) -> torch.Tensor:
    """Lloyd-style alternation (docs/RECIPE.md section 2): q = round(w/s) for fixed s, s = <w,q>/<q,q> for fixed q.

    Each half-step minimises ``||s q - w||^2`` over one variable, so the objective
    never increases. Starts from min-max unless ``s0`` is given. If ``history`` is a
    list, the objective before the first and after every iteration is appended.
    """
    rows = _rows(w).float()
    s = (minmax_scale(w, grid) if s0 is None else s0.float().reshape(-1)).clone()  # (O, 1) would broadcast to (O, O)
    if history is not None:
        history.append(float(quant_error(rows, s, grid).sum()))
    for _ in range(iters):
        q = quantize_levels(rows, s, grid)
        qq = (q * q).sum(1)
        wq = (rows * q).sum(1)
        s = torch.where(qq > 0, wq / qq.clamp_min(1e-30), s)  # an all-zero q keeps its scale
        if history is not None:
            history.append(float(quant_error(rows, s, grid).sum()))
    return s


def init_scale(w: torch.Tensor, grid: Grid, method: str, iters: int = DEFAULT_ALT_ITERS) -> torch.Tensor:
    if method == "minmax":
        return minmax_scale(w, grid)
    if method == "alt":
        return alternating_scale(w, grid, iters)
    raise ValueError(f"init must be one of {INIT_METHODS}, got {method!r}")


def lsq_grad_scale(w: torch.Tensor, grid: Grid) -> float:
    """LSQ's step-size gradient scale 1/sqrt(N * qmax), N = weights sharing one scale."""
    n = _rows(w).shape[1]
    return 1.0 / math.sqrt(n * max(grid.qmax, 1))


class FakeQuantize(torch.autograd.Function):
    """``s * clip(round(w/s))`` with straight-through and LSQ gradients.

    d/dw: 1 where qmin <= w/s <= qmax, else 0 (STE inside the clip range).
    d/ds: (q - w/s) inside the range, q (= qmin or qmax) outside, summed per row and
    multiplied by ``grad_scale``. Saves only ``w`` and ``s``: the rest is recomputed.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
        ctx.save_for_backward(w, s)
        ctx.qrange = (qmin, qmax)
        ctx.grad_scale = grad_scale
        sb = _bcast(s, w)
        return torch.clamp(torch.round(w / sb), qmin, qmax) * sb

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, s = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        x = w / _bcast(s, w)
        q = torch.clamp(torch.round(x), qmin, qmax)
        inside = (x >= qmin) & (x <= qmax)
        gw = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (_rows(g * torch.where(inside, q - x, q)).sum(1) * ctx.grad_scale).reshape(s.shape)  # autograd wants s's shape
        return gw, gs, None, None, None


def fake_quantize(w: torch.Tensor, s: torch.Tensor, grid: Grid, grad_scale: float | None = None) -> torch.Tensor:
    gs = lsq_grad_scale(w, grid) if grad_scale is None else grad_scale
    if fused_fake_quant.available(w):  # one pass each way on CUDA (the reference's float ops, fused)
        return fused_fake_quant.FusedFakeQuantize.apply(w, s, grid.qmin, grid.qmax, gs)
    return FakeQuantize.apply(w, s, grid.qmin, grid.qmax, gs)
