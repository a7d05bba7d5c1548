"""Which layers and tile shapes the Hopper TMA kernel (bf.runtime.lowbit_wgmma) takes, and the input view and TMA
box it reads them by: shapes only (torch, no Triton), so they are tested without a GPU.

A convolution's pixel tile is whole image rows, or whole images: then each kernel tap is one TMA box at
(image, row + dy, column + dx, channel), the box's parts outside the image arriving as zeros (the padding). A linear
layer, or a 1x1 convolution, is one row of M pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bf.runtime.fused_layout import FusedWeight

# An sm_90 block's shared memory (227 KiB), less 1 KiB for what Triton adds to the buffers stages() counts
# (about 200 bytes measured: its alignment and scratch)
SHARED_BYTES = 226 * 1024


@dataclass(frozen=True)
class WgmmaConfig:
    block_n: int  # output channels per tile: the tensor-core M, 16 per warp
    block_m: int  # pixels per tile: the tensor-core N (8..256)
    block_k: int  # input channels per stage
    warps: int
    stages: int
    splits: int = 0  # split-K; 0: enough to give every multiprocessor a tile
    decode_warps: int = 8  # the warps that decode codes into FP16 tiles (one more copies, ``warps`` run the products)

    @property
    def name(self) -> str:
        return f"wg{self.block_n}x{self.block_m}x{self.block_k}w{self.warps}d{self.decode_warps}s{self.stages}k{self.splits or 'A'}"


CONFIGS = (
    WgmmaConfig(64, 128, 64, 4, 3),
    WgmmaConfig(128, 128, 64, 8, 3),
    WgmmaConfig(64, 256, 64, 4, 3, decode_warps=4),
    WgmmaConfig(128, 64, 64, 8, 4),
    WgmmaConfig(64, 64, 64, 4, 4),
    WgmmaConfig(64, 128, 64, 4, 3, decode_warps=4),
)


def nhwc_view(x: torch.Tensor, fw: FusedWeight):
    """(the input as [images, rows, columns, channels], pixels M, output shape), for a layer ``unsupported`` takes. A
    linear layer or 1x1 convolution is one row of M pixels. The view gets the dense NHWC strides even along dimensions
    of size 1, where PyTorch may give others (which TMA would refuse)."""
    if x.dim() == 4:
        b, c, h, w = x.shape
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        shape = (1, 1, b * h * w, c) if fw.kernel == (1, 1) else (b, h, w, c)
        out_shape = (b, fw.out_channels, h, w)
    else:
        c = x.shape[-1]
        x = x.contiguous()
        shape = (1, 1, x.numel() // c, c)
        out_shape = (*x.shape[:-1], fw.out_channels)
    if x.data_ptr() % 16:  # a view that starts mid-row: TMA wants 16-byte aligned rows
        x = x.clone()
    _, h, w, _ = shape
    return x.as_strided(shape, (h * w * c, w * c, c, 1)), shape[0] * h * w, out_shape


def tile_box(nhwc: torch.Tensor, block_m: int) -> list[int]:
    """The TMA box [images, rows, columns] of a block_m-pixel tile: whole rows of one image, or whole images (a
    linear layer's, or 1x1 convolution's, one row of pixels: block_m of them)."""
    b, h, w, _ = nhwc.shape
    if b == 1 and h == 1:  # (also a k x k convolution's one row of one image: unsupported() keeps its width <= block_m)
        return [1, 1, block_m]
    rows = block_m // w
    return [1, rows, w] if rows <= h else [rows // h, h, w]


def unsupported(x_shape: tuple, fw: FusedWeight, cfg: WgmmaConfig) -> str | None:
    """Why wgmma_forward cannot run this layer on input of ``x_shape`` with ``cfg`` (None: it can)."""
    kh, kw = fw.kernel
    if len(x_shape) == 4 and (kh, kw) != (1, 1):
        if fw.stride != 1 or kh != kw or kh % 2 == 0 or fw.padding != kh // 2:
            return "a strided or size-changing convolution"
        h, w = x_shape[2], x_shape[3]
        if w > 256 or cfg.block_m % w:
            return f"a {cfg.block_m}-pixel tile is not whole rows of width {w}"
        rows = cfg.block_m // w
        if (rows <= h and h % rows) or (rows > h and rows % h):
            return f"a {cfg.block_m}-pixel tile is not whole rows of one {h}x{w} image or whole images"
    elif len(x_shape) == 4 and (fw.stride != 1 or fw.padding != 0):
        return "a strided or padded 1x1 convolution"
    c = x_shape[1] if len(x_shape) == 4 else x_shape[-1]
    if c % 8:
        return f"{c} input channels: TMA rows must be a multiple of 16 bytes"
    if c % (32 // fw.code_bits):
        return f"{c} input channels: not whole words of {32 // fw.code_bits} codes"
    if fw.out_channels % 4:
        return f"{fw.out_channels} output channels: TMA rows of code words must be a multiple of 16 bytes"
    if cfg.warps % 4 or cfg.block_n % (16 * cfg.warps) or not 8 <= cfg.block_m <= 256 or cfg.block_m % 8:
        return f"tile {cfg.name} does not map onto warp-group products"
    lanes = cfg.block_n // cfg.decode_warps  # the decoding warps split the output channels
    if cfg.block_n % cfg.decode_warps or not 1 <= lanes <= 32 or lanes & (lanes - 1):
        return f"tile {cfg.name}: {cfg.decode_warps} decoding warps cannot split {cfg.block_n} output channels"
    return None


def block_k(cfg: WgmmaConfig, fw: FusedWeight) -> int:
    """The K tile the kernel runs ``cfg`` at for ``fw``'s codes."""
    # A TMA tile of words wants 8 rows or more (the 128-byte swizzle's period): K tiles of 128 codes at 2 bits.
    return max(cfg.block_k, 256 // fw.code_bits)


def stages(cfg: WgmmaConfig, block_k: int, code_bits: int) -> int:
    """cfg.stages, fewer where they would not fit in shared memory (2 at least: one filling while one is read)."""
    per_stage = 2 * block_k * (cfg.block_m + cfg.block_n) + block_k * code_bits // 8 * cfg.block_n + 24  # + 3 barriers
    return max(2, min(cfg.stages, SHARED_BYTES // per_stage))
