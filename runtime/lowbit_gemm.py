"""Convolutions and linear layers that read low-bit codes directly: the weight is decoded inside
the matrix-product tiles (Triton), so it never exists in FP16 in device memory.

Decoding into a buffer first (bf.runtime.streamed_weights) writes every FP16 weight and reads it
back: about 1.9 GB of extra traffic per SD-v1.5 step. Here each program loads 32-bit words of
codes, extracts its codes with shifts and masks, and feeds them to the tensor cores; the per-row
scale multiplies the accumulator once, at the end.

The codes come re-laid in power-of-two fields (bf.runtime.fused_layout): the .bfq's radix fields
would need divisions to split.

One kernel serves every case: an implicit-GEMM convolution over an NHWC input (a 1x1 convolution
or a linear layer is the 1x1 case), with optional split-K for layers with few output rows (the
8x8 and 16x16 latents, where the weight is most of the bytes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bf.errors import BfError
from bf.runtime.fused_layout import FusedWeight


@triton.jit
def _tile_offsets(M, N, OH, OW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The output rows (pixels) and columns (channels) of this program's tile, and its pixels' image, row and column."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Consecutive programs share a column of weight tiles, so it is read from DRAM about once.
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_m, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), offs_m // (OW * OH), (offs_m // OW) % OH, offs_m % OW


@triton.jit
def _input_tile(x_ptr, it, c_iters, img, oy, ox, m_ok, C, H, W, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """Iteration ``it`` of the implicit GEMM over an NHWC input: the kernel tap ``r`` and the run of channels ``c``
    it covers, and its [pixels, BLOCK_K] input tile, zero where the tap falls outside the image."""
    r = it // c_iters
    c = (it - r * c_iters) * BLOCK_K + tl.arange(0, BLOCK_K)
    iy = oy * STRIDE - PAD + r // KW
    ix = ox * STRIDE - PAD + r % KW
    row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    pix = ((img * H + iy) * W + ix).to(tl.int64) * C
    return r, c, tl.load(x_ptr + pix[:, None] + c[None, :], mask=row_ok[:, None] & (c[None, :] < C), other=0.0)


@triton.jit
def _accumulate(acc, a, wt, SWAP: tl.constexpr):
    """``acc`` plus input tile ``a`` times weight tile ``wt``; with ``SWAP`` the accumulator is the transposed product
    (out^T = W x^T: the weight the first operand, which the tensor cores may take from registers)."""
    if SWAP:
        acc = tl.dot(tl.trans(wt), tl.trans(a), acc)
    else:
        acc = tl.dot(a, wt, acc)
    return acc


@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "HALF", "ITERS_PER_SPLIT"])
def _lowbit_conv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr,
    M, N, C, H, W, OH, OW, HALF, ITERS_PER_SPLIT,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    CODE_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, GATHER: tl.constexpr,
    MAGIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    PER_WORD: tl.constexpr = 32 // CODE_BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    MASK: tl.constexpr = (1 << CODE_BITS) - 1
    # MAGIC: fp16 1024 + code has the bits 0x6400 | code (code < 1024), so an OR and one fp16 subtraction give the
    # level exactly, instead of an int-to-float conversion; which is faster depends on the tile (sd15_layer_paths --fused).
    level0 = (HALF + 1024).to(tl.float16)
    split = tl.program_id(1)
    offs_m, offs_n, img, oy, ox = _tile_offsets(M, N, OH, OW, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_w = tl.arange(0, WORDS)
    shifts = tl.arange(0, PER_WORD) * CODE_BITS

    c_iters = tl.cdiv(C, BLOCK_K)
    total = KH * KW * c_iters
    start = split * ITERS_PER_SPLIT
    stop = tl.minimum(start + ITERS_PER_SPLIT, total)
    if SWAP:  # see _accumulate
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(start, stop):
        r, c, a = _input_tile(x_ptr, it, c_iters, img, oy, ox, m_ok, C, H, W, KW, STRIDE, PAD, BLOCK_K)
        if GATHER:  # each code loads its word (the repeats hit L1): no reshape of the tile
            k = r * C + c
            words = tl.load(w_ptr + (k // PER_WORD)[:, None].to(tl.int64) * N + offs_n[None, :], mask=(c < C)[:, None] & n_ok[None, :],
                            other=0)  # fmt: skip
            codes = (words >> ((k % PER_WORD) * CODE_BITS)[:, None]) & MASK
        else:  # one load per word, split into its codes along a new axis, folded into K
            # C is a multiple of PER_WORD (checked on the host), so a tile's codes are whole words.
            c0 = (it - r * c_iters) * BLOCK_K
            word = (r * C + c0) // PER_WORD + offs_w
            word_ok = (c0 + offs_w * PER_WORD < C)[:, None] & n_ok[None, :]
            words = tl.load(w_ptr + word[:, None].to(tl.int64) * N + offs_n[None, :], mask=word_ok, other=0)
            codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, (BLOCK_K, BLOCK_N))
        if MAGIC:
            wt = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - level0
        else:
            wt = (codes - HALF).to(tl.float16)
        acc = _accumulate(acc, a, wt, SWAP)
    if SWAP:
        acc = tl.trans(acc)

    out = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + split.to(tl.int64) * M * N + out, acc, mask=ok)
    else:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + out, acc.to(tl.float16), mask=ok)


@triton.jit
def _split_sum_kernel(part_ptr, s_ptr, b_ptr, y_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # splits x M x N may pass 2^31
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
    n = offs % N
    acc = acc * tl.load(s_ptr + n, mask=ok, other=0.0)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(tl.float16), mask=ok)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    splits: int = 1  # split-K: partial sums in fp32, added by a second kernel; 0: enough to give every multiprocessor a tile
    swap: bool = False  # compute out^T = W x^T (the weight as the first operand)
    gather: bool = False  # load each code's word (repeats served by L1) instead of splitting loaded words
    magic: bool = True  # fp16 levels from bit patterns, not int-to-float conversions

    @property
    def name(self) -> str:
        flags = ("t" if self.swap else "") + ("g" if self.gather else "") + ("" if self.magic else "c")
        splits = self.splits or "A"
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.warps}s{self.stages}k{splits}{flags}"


# Tried in this order per layer and input shape by bf.runtime.streamed_weights; small-M layers
# (the low-resolution latents) need split-K to fill the GPU.
CONFIGS = (
    TileConfig(128, 128, 64, 8, 3),
    TileConfig(64, 128, 64, 4, 4),
    TileConfig(128, 64, 64, 4, 4),
    TileConfig(64, 64, 64, 4, 4, splits=4),
    TileConfig(64, 128, 64, 4, 4, splits=8),
    TileConfig(32, 64, 128, 4, 4, splits=8),
    TileConfig(64, 128, 64, 4, 4, swap=True),
    TileConfig(128, 128, 64, 8, 3, swap=True),
    TileConfig(32, 128, 128, 4, 4, splits=4, swap=True),
    TileConfig(64, 128, 64, 4, 4, splits=8, swap=True),
)


def tile_times(x: torch.Tensor, fw: FusedWeight, configs, bias: torch.Tensor | None = None, forward=None) -> dict:
    """Milliseconds per call of each tile configuration on ``x`` (bf.runtime.torch_graph.graph_time_ms), run by
    ``forward(x, fw, cfg, bias)`` (default lowbit_forward); a tile this GPU cannot hold (shared memory, registers)
    is left out."""
    from bf.runtime.torch_graph import graph_time_ms

    forward = forward or lowbit_forward
    times = {}
    for cfg in configs:
        try:
            times[cfg] = graph_time_ms(lambda cfg=cfg: forward(x, fw, cfg, bias))
        except Exception as e:
            if "out of resource" not in str(e).lower() and "OutOfResources" not in type(e).__name__:
                raise
    return times


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(iterations: int, tiles: int, splits: int, device: torch.device) -> tuple[int, int]:
    """(K iterations per split, splits) for a launch of ``tiles`` output tiles over ``iterations`` K iterations;
    ``splits`` 0: enough splits to give every multiprocessor a tile."""
    per_split = math.ceil(iterations / (splits or max(1, min(iterations, _multiprocessors(device) // tiles))))
    return per_split, math.ceil(iterations / per_split)


def lowbit_forward(x: torch.Tensor, fw: FusedWeight, cfg: TileConfig, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output for ``x``: NHWC (channels-last NCHW tensor) for a convolution, [..., in] for a linear layer."""
    if x.dtype != torch.float16:
        raise BfError(f"the fused low-bit kernel takes float16 input, got {x.dtype}")
    kh, kw = fw.kernel
    if x.dim() == 4:  # convolution, NCHW shape with channels-last strides
        b, c, h, w = x.shape
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        oh, ow = (h + 2 * fw.padding - kh) // fw.stride + 1, (w + 2 * fw.padding - kw) // fw.stride + 1
        y = torch.empty((b, fw.out_channels, oh, ow), dtype=torch.float16, device=x.device, memory_format=torch.channels_last)
        m = b * oh * ow
        if (kh, kw, fw.stride, fw.padding) == (1, 1, 1, 0):  # pointwise: one long row of pixels
            geometry, h, w, oh, ow = (1, 1, 1, 0), 1, 1, 1, 1
        else:
            geometry = (kh, kw, fw.stride, fw.padding)
    else:
        c = x.shape[-1]
        x = x.contiguous()
        m = x.numel() // c
        h = w = oh = ow = 1
        geometry = (1, 1, 1, 0)
        y = torch.empty((*x.shape[:-1], fw.out_channels), dtype=torch.float16, device=x.device)
    if c != fw.in_channels:
        raise BfError(f"the fused layer takes {fw.in_channels} input channels, got {c}")
    n = fw.out_channels
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    per_split, splits = split_k(geometry[0] * geometry[1] * math.ceil(c / cfg.block_k), tiles, cfg.splits, x.device)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    has_bias = bias is not None
    bias = bias if has_bias else fw.scale  # a pointer the kernel never reads
    grid = (tiles, splits)
    _lowbit_conv_kernel[grid](
        x, fw.words, fw.scale, bias, y, part, m, n, c, h, w, oh, ow, fw.half, per_split,
        KH=geometry[0], KW=geometry[1], STRIDE=geometry[2], PAD=geometry[3], CODE_BITS=fw.code_bits,
        HAS_BIAS=has_bias, SPLIT=splits > 1, SWAP=cfg.swap, GATHER=cfg.gather, MAGIC=cfg.magic,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    if splits > 1:
        sum_splits(part, fw.scale, bias if has_bias else None, y)
    return y


def sum_splits(part: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """Write into ``y`` the sum of split-K partial sums ``part`` [splits, M, N] times the per-row ``scale``, plus ``bias``."""
    splits, m, n = part.shape
    block = 1024
    _split_sum_kernel[(triton.cdiv(m * n, block),)](part, scale, scale if bias is None else bias, y, m * n, n, splits,
                                                     HAS_BIAS=bias is not None, BLOCK=block)  # fmt: skip
