"""Fake quantization in one pass each way, with Triton, for CUDA weights.

``FakeQuantize`` in quantizer.py is the reference: about five elementwise kernels forward
(divide, round, clamp, multiply) and as many backward plus a reduction, each reading and
writing the whole fp32 latent weight. On SD-v1.5 that is ~100 GB of memory traffic per step.
Here one kernel reads ``w`` and writes ``s * clip(round(w / s))``; backward, one kernel per
row reads ``w`` and the incoming gradient, writes the weight's gradient and reduces the
scale's LSQ gradient, in the same order of float operations (so forward is bit-identical to
the reference and the gradients agree to float32 summation order; tests/trainer/test_qat.py checks
both on a GPU). Used automatically for CUDA tensors when Triton is importable;
``BF_FUSED_FAKE_QUANT=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU installs: the reference path is used
    triton = None

BLOCK = 1024


def available(w: torch.Tensor) -> bool:
    return triton is not None and w.is_cuda and w.dtype == torch.float32 and os.environ.get("BF_FUSED_FAKE_QUANT", "1") != "0"


if triton is not None:

    @triton.jit
    def _forward(w_ptr, s_ptr, y_ptr, n, qmin, qmax, BLOCK: tl.constexpr):  # noqa: N803 (Triton constexpr style)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        s = tl.load(s_ptr + row)
        w = tl.load(w_ptr + row.to(tl.int64) * n + cols, mask=mask, other=0.0)
        q = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(w, s)), qmin), qmax)
        tl.store(y_ptr + row.to(tl.int64) * n + cols, (q * s).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward(w_ptr, s_ptr, g_ptr, gw_ptr, gs_ptr, n, qmin, qmax, grad_scale, BLOCK: tl.constexpr):  # noqa: N803
        row = tl.program_id(0)
        base = row.to(tl.int64) * n
        s = tl.load(s_ptr + row)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            w = tl.load(w_ptr + base + cols, mask=mask, other=0.0)
            g = tl.load(g_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.math.div_rn(w, s)
            q = tl.minimum(tl.maximum(libdevice.rint(x), qmin), qmax)
            inside = (x >= qmin) & (x <= qmax)
            tl.store(gw_ptr + base + cols, tl.where(inside, g, 0.0), mask=mask)
            acc += tl.where(mask, g * tl.where(inside, q - x, q), 0.0)
        tl.store(gs_ptr + row, tl.sum(acc, axis=0) * grad_scale)


class FusedFakeQuantize(torch.autograd.Function):
    """Same contract as quantizer.FakeQuantize, for fp32 CUDA weights; the output is in the autocast type when autocast is on."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
        w2 = w.contiguous().view(w.shape[0], -1)
        s1 = s.reshape(-1).float().contiguous()
        # Under bf16/fp16 autocast the layer would cast the weight right away: write it in that
        # type directly (the same rounding of the same float32 value) and skip the cast's passes.
        out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else w.dtype
        y = torch.empty(w2.shape, dtype=out_dtype, device=w.device)
        rows, n = w2.shape
        _forward[(rows, triton.cdiv(n, BLOCK))](w2, s1, y, n, float(qmin), float(qmax), BLOCK=BLOCK)
        ctx.save_for_backward(w2, s1)
        ctx.meta = (qmin, qmax, grad_scale, w.shape, s.shape)
        return y.view(w.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w2, s1 = ctx.saved_tensors
        qmin, qmax, grad_scale, w_shape, s_shape = ctx.meta
        g2 = g.contiguous().view(w2.shape)  # float32, or the autocast type (converted in the kernel)
        gw, gs = torch.empty_like(w2), torch.empty_like(s1)
        rows, n = w2.shape
        _backward[(rows,)](w2, s1, g2, gw, gs, n, float(qmin), float(qmax), float(grad_scale), BLOCK=BLOCK)
        return (
            gw.view(w_shape) if ctx.needs_input_grad[0] else None,
            gs.view(s_shape) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
        )
