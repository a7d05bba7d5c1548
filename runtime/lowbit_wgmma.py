"""Convolutions and linear layers on low-bit codes for Hopper (sm_90) GPUs, written in Gluon with warp specialization:
one warp copies each stage's input box and code words into shared memory by the tensor memory accelerator (TMA),
decoding warps turn the words into FP16 weight tiles a stage or more ahead, and the tensor-core warps run
asynchronous warp-group products on the tiles, so decoding, copying and products overlap.

A convolution's tap is one TMA box: a pixel tile is whole image rows, so the tap (dy, dx) is the box at
(image, row + dy, column + dx, channel), and the box's parts outside the image arrive as zeros: the convolution's
padding at no cost. A linear layer, or a 1x1 convolution, is the same box over one row of M pixels.

What it runs: stride-1 convolutions whose padding keeps the size (odd square kernels), and linear layers, on float16
NHWC input; a pixel tile must be whole rows of one image or whole images (bf.runtime.tma_tiles, torch only, holds
those rules and the tiles). Codes come in bf.runtime.fused_layout's words; the per-row scale multiplies the
accumulator once, at the end; split-K partial sums are added by bf.runtime.lowbit_gemm.sum_splits.

The decoded tile is the products' shared-memory operand. As their register operand, with a product in flight while
the next tile decodes, Triton 3.6 gave wrong outputs.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from bf.errors import BfError
from bf.runtime.fused_layout import FusedWeight
from bf.runtime.lowbit_gemm import split_k, sum_splits
from bf.runtime.tma_tiles import WgmmaConfig, block_k, nhwc_view, stages, tile_box, unsupported

DECODE_REGS = 88  # registers per decoding thread; the loader warp gets the fewest there are (24), the products the rest


@gluon.jit
def _loader(p):
    """One warp: each stage's input box (a kernel tap over a run of channels) and the words of the same K range, by TMA,
    once the tensor cores are done with the stage."""
    descs, bufs, bars, loop, box, n0, _half = p
    x_desc, w_desc = descs
    x_smem, w_smem, _a_smem = bufs
    ready, _decoded, empty = bars
    start, n_iters = loop
    c_iters, C, img0, row0, col0, KW, PAD, PER_WORD = box
    STAGES: gl.constexpr = x_smem.type.shape[0]
    BLOCK_K: gl.constexpr = x_smem.type.shape[4]
    for i in range(n_iters):
        stage = i % STAGES
        mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1: all start free
        it = start + i
        r = it // c_iters
        c0 = (it - r * c_iters) * BLOCK_K
        bar = ready.index(stage)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [img0, row0 + r // KW - PAD, col0 + r % KW - PAD, c0], bar, x_smem.index(stage))
        # C is a multiple of PER_WORD (tma_tiles.unsupported), so a K tile's codes are whole words; past C (the last tile
        # of a tap) they are the next tap's or zeros, against input that is zero there.
        tma.async_copy_global_to_shared(w_desc, [(r * C + c0) // PER_WORD, n0], bar, w_smem.index(stage))


@gluon.constexpr_function
def _decode_layout(block_n, words, per_word, num_warps):
    """[BLOCK_N, words, per_word]: a thread holds one output channel's words and splits each into its run of codes
    along K, so its levels go to shared memory as 16-byte stores."""
    lanes_n = min(32, block_n // num_warps)
    return gl.BlockedLayout([1, 1, per_word], [lanes_n, 32 // lanes_n, 1], [num_warps, 1, 1], [2, 1, 0])


@gluon.jit
def _decoder(p):
    """The decoding warps: each stage's words into the FP16 weight tile the tensor cores read."""
    _descs, bufs, bars, loop, _box, _n0, HALF = p
    _x_smem, w_smem, a_smem = bufs
    ready, decoded, _empty = bars
    _start, n_iters = loop
    # (constants from the buffers' shapes: those passed to a worker partition arrive as run-time values)
    STAGES: gl.constexpr = a_smem.type.shape[0]
    BLOCK_N: gl.constexpr = a_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    WORDS: gl.constexpr = w_smem.type.shape[1]
    CODES: gl.constexpr = BLOCK_K // WORDS  # codes per word
    decode_layout: gl.constexpr = _decode_layout(BLOCK_N, WORDS, CODES, gl.num_warps())
    words_layout: gl.constexpr = gl.SliceLayout(2, decode_layout)
    shifts = (gl.arange(0, CODES, layout=gl.SliceLayout(0, gl.SliceLayout(1, decode_layout))) * (32 // CODES))[None, None, :]
    # fp16 1024 + code has the bits 0x6400 | code: an OR and one subtraction give the level (code - HALF) exactly.
    level0 = (HALF + 1024).to(gl.float16)
    for i in range(n_iters):
        stage = i % STAGES
        # The stage's words have landed; its weight tile is free too: the loader waited for the tensor cores' release
        # of the stage before refilling it.
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        words = w_smem.index(stage).permute((1, 0)).load(words_layout)
        codes = ((words[:, :, None] >> shifts) & ((1 << (32 // CODES)) - 1)) | 0x6400
        levels = codes.to(gl.int16).to(gl.float16, bitcast=True) - level0
        a_smem.index(stage).store(gl.reshape(levels, [BLOCK_N, BLOCK_K]))
        fence_async_shared()  # the stores, visible to the tensor cores' reads
        # One thread arrives, after the barrier Triton puts before an arrive: every decoding warp's stores are done.
        mbarrier.arrive(decoded.index(stage), count=1)


@gluon.jit
def _products(p, acc, out, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr):
    """The tensor-core warps (the default partition): one asynchronous product per stage, one in flight; then the
    tile's output (its partial sum, under split-K)."""
    _descs, bufs, bars, loop, _box, n0, _half = p
    x_smem, _w_smem, a_smem = bufs
    ready, decoded, empty = bars
    _start, n_iters = loop
    STAGES: gl.constexpr = x_smem.type.shape[0]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    BLOCK_M: gl.constexpr = x_smem.type.shape[1] * x_smem.type.shape[2] * x_smem.type.shape[3]
    x_tile_layout: gl.constexpr = gl.NVMMASharedLayout(a_smem.type.layout.swizzle_byte_width, 16)
    for i in range(n_iters):
        stage = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(ready.index(stage), phase)
        mbarrier.wait(decoded.index(stage), phase)
        x_tile = x_smem.index(stage)._reinterpret(gl.float16, [BLOCK_M, BLOCK_K], x_tile_layout)
        acc = warpgroup_mma(a_smem.index(stage), x_tile.permute((1, 0)), acc, is_async=True)
        # the product before this one is done: its stage goes back to the loader
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    _epilogue(acc, out, n0, HAS_BIAS, SPLIT)


@gluon.jit
def _epilogue(acc, out, n0, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr):
    s_ptr, b_ptr, y_ptr, part_ptr, M, N, pixel0, split = out
    BLOCK_N: gl.constexpr = acc.type.shape[0]
    BLOCK_M: gl.constexpr = acc.type.shape[1]
    # stored from the accumulator's own layout (pairs of pixels a thread, strided by N): once a tile, and without the
    # shared-memory scratch a layout conversion would take
    offs_cn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc.type.layout))
    offs_cm = pixel0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc.type.layout))
    offs = offs_cm[None, :].to(gl.int64) * N + offs_cn[:, None]
    ok = (offs_cm < M)[None, :] & (offs_cn < N)[:, None]
    if SPLIT:
        gl.store(part_ptr + split.to(gl.int64) * M * N + offs, acc, mask=ok)
    else:
        acc = acc * gl.load(s_ptr + offs_cn, mask=offs_cn < N, other=0.0)[:, None]
        if HAS_BIAS:
            acc = acc + gl.load(b_ptr + offs_cn, mask=offs_cn < N, other=0.0).to(gl.float32)[:, None]
        gl.store(y_ptr + offs, acc.to(gl.float16), mask=ok)


@gluon.jit(do_not_specialize=["M", "H", "W", "HALF", "ITERS_PER_SPLIT"])
def _wgmma_lowbit_kernel(
    x_desc, w_desc, s_ptr, b_ptr, y_ptr, part_ptr,
    M, N, C, H, W, HALF, ITERS_PER_SPLIT,
    KH: gl.constexpr, KW: gl.constexpr, PAD: gl.constexpr, CODE_BITS: gl.constexpr, HAS_BIAS: gl.constexpr,
    SPLIT: gl.constexpr, BLOCK_N: gl.constexpr, SWIZZLE: gl.constexpr, STAGES: gl.constexpr, DECODE_WARPS: gl.constexpr,
    DECODE_REGS: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BI: gl.constexpr = x_desc.block_type.shape[0]
    BR: gl.constexpr = x_desc.block_type.shape[1]
    BW: gl.constexpr = x_desc.block_type.shape[2]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[3]
    BLOCK_M: gl.constexpr = BI * BR * BW  # pixels of the tile: the N of the tensor-core product
    PER_WORD: gl.constexpr = 32 // CODE_BITS

    pixel0 = gl.program_id(0) * BLOCK_M
    n0 = gl.program_id(1) * BLOCK_N
    split = gl.program_id(2)
    img0 = pixel0 // (H * W)
    row0 = (pixel0 // W) % H
    col0 = pixel0 % W
    c_iters = gl.cdiv(C, BLOCK_K)
    start = split * ITERS_PER_SPLIT
    n_iters = gl.minimum(start + ITERS_PER_SPLIT, KH * KW * c_iters) - start

    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BI, BR, BW, BLOCK_K], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_K // PER_WORD, BLOCK_N], w_desc.layout)
    a_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, BLOCK_K], gl.NVMMASharedLayout(SWIZZLE, 16))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    decoded = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(decoded.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    fence_async_shared()

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma_layout)
    # what every partition gets: the descriptors, the stage buffers and their barriers, its iterations, where the
    # input boxes lie, the first output channel, the level of code 0
    box = (c_iters, C, img0, row0, col0, KW, PAD, PER_WORD)
    p = ((x_desc, w_desc), (x_smem, w_smem, a_smem), (ready, decoded, empty), (start, n_iters), box, n0, HALF)
    out = (s_ptr, b_ptr, y_ptr, part_ptr, M, N, pixel0, split)
    # (the default partition writes the output itself: Triton 3.6 cannot return a tensor from it; constants travel
    # as arguments of their own: in a tuple they arrive as run-time values)
    gl.warp_specialize([(_products, (p, acc, out, HAS_BIAS, SPLIT)), (_loader, (p,)), (_decoder, (p,))], [1, DECODE_WARPS],
                       [24, DECODE_REGS])  # fmt: skip


def wgmma_forward(x: torch.Tensor, fw: FusedWeight, cfg: WgmmaConfig, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output for ``x``: NHWC (channels-last NCHW tensor) for a convolution, [..., in] for a linear layer."""
    if x.dtype != torch.float16:
        raise BfError(f"the TMA low-bit kernel takes float16 input, got {x.dtype}")
    why = unsupported(tuple(x.shape), fw, cfg)
    if why:
        raise BfError(f"the TMA low-bit kernel cannot run this layer: {why}")
    nhwc, m, out_shape = nhwc_view(x, fw)
    c = nhwc.shape[-1]
    if c != fw.in_channels:
        raise BfError(f"the fused layer takes {fw.in_channels} input channels, got {c}")
    bk = block_k(cfg, fw)
    n_stages = stages(cfg, bk, fw.code_bits)
    swizzle = min(128, bk * 2)
    x_layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=16, rank=4)
    x_desc = TensorDescriptor(nhwc, list(nhwc.shape), list(nhwc.stride()), [*tile_box(nhwc, cfg.block_m), bk], x_layout)
    w_box = [bk * fw.code_bits // 32, cfg.block_n]
    w_desc = TensorDescriptor(fw.words, list(fw.words.shape), list(fw.words.stride()), w_box,
                              gl.NVMMASharedLayout.get_default_for(w_box, gl.int32))  # fmt: skip
    n = fw.out_channels
    if x.dim() == 4:
        y = torch.empty(out_shape, dtype=torch.float16, device=x.device, memory_format=torch.channels_last)
    else:
        y = torch.empty(out_shape, dtype=torch.float16, device=x.device)
    kh, kw = fw.kernel  # (1, 1) for a linear layer
    tiles_m, tiles_n = triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n)
    per_split, splits = split_k(kh * kw * math.ceil(c / bk), tiles_m * tiles_n, cfg.splits, x.device)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    has_bias = bias is not None
    bias = bias if has_bias else fw.scale  # a pointer the kernel never reads
    # Registers are handed out per warp group: the whole CTA's warps (rounded up to groups of 4) share the 64K.
    warps = -(-(cfg.warps + 1 + cfg.decode_warps) // 4) * 4
    _wgmma_lowbit_kernel[(tiles_m, tiles_n, splits)](
        x_desc, w_desc, fw.scale, bias, y, part, m, n, c, nhwc.shape[1], nhwc.shape[2], fw.half, per_split,
        KH=kh, KW=kw, PAD=kh // 2, CODE_BITS=fw.code_bits, HAS_BIAS=has_bias, SPLIT=splits > 1, BLOCK_N=cfg.block_n,
        SWIZZLE=swizzle, STAGES=n_stages, DECODE_WARPS=cfg.decode_warps, DECODE_REGS=DECODE_REGS, num_warps=cfg.warps,
        maxnreg=min(256, 65536 // (32 * warps) // 8 * 8),
    )  # fmt: skip
    if splits > 1:
        sum_splits(part, fw.scale, bias if has_bias else None, y)
    return y
