"""The layout of low-bit codes that the fused kernels (bf.runtime.lowbit_gemm, bf.runtime.lowbit_wgmma) read.

The .bfq's radix fields (5 ternary codes per byte, 3 five-level codes per 7 bits, ...) need
divisions to split, which a matrix-product tile cannot afford per element. Here each code gets a
power-of-two field instead (2 bits for 3 levels, 4 bits up to 16 levels, 8 bits up to 256),
32 / field codes per int32 word, the first code in the low bits. Words are laid [K / per_word, N]
(N: output channels), so the K-tile of one output channel is a run of consecutive words, and K
runs in (kh, kw, in) order: the channels-last order of a convolution's input.

This costs more resident bytes than the .bfq's packing (2 bits for a 1.6-bit ternary code, 4 for
a 2.3-bit five-level one), still about 6x under FP16 at the 1.99-bit mix. Torch only: no Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def code_bits(levels: int) -> int:
    """The power-of-two field a code of ``levels`` levels gets in the fused layout (0: none fits)."""
    for b in (2, 4, 8):
        if levels <= 1 << b:
            return b
    return 0


@dataclass
class FusedWeight:
    """A conv / linear weight's codes in the fused kernel's layout, with what it needs to run."""

    words: torch.Tensor  # int32 [K / per_word, N]; K in (kh, kw, in) order
    scale: torch.Tensor  # float32 [N]
    out_channels: int
    in_channels: int
    kernel: tuple[int, int]
    stride: int
    padding: int
    code_bits: int
    half: int  # the level of code 0 is -half

    @property
    def nbytes(self) -> int:
        return self.words.numel() * 4 + self.scale.numel() * 4


def fusable(module: torch.nn.Module, levels: int) -> str | None:
    """Why the fused kernel cannot run this layer (None: it can)."""
    bits = code_bits(levels)
    if not bits:
        return f"{levels} levels need more than 8 bits"
    if isinstance(module, torch.nn.Linear):
        cin = module.in_features
    elif isinstance(module, torch.nn.Conv2d):
        cin = module.in_channels
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "grouped, dilated, non-zero or string-padded convolution"
        if len(set(module.stride)) != 1 or len(set(module.padding)) != 1:
            return "uneven stride or padding"
    else:
        return f"a {type(module).__name__}"
    if cin % (32 // bits):
        return f"{cin} input channels are not a multiple of {32 // bits} codes a word"
    return None


def fused_weight(codes: torch.Tensor, scale: torch.Tensor, module: torch.nn.Module, levels: int,
                 chunk_elements: int = 1 << 22) -> FusedWeight:  # fmt: skip
    """The fused layout of ``codes``: integer codes [out, kh, kw, in] (or [out, in]) in 0..levels-1. The words are
    packed ``chunk_elements`` codes at a time (whole output channels), so the 64-bit shifts need 16 bytes a code of
    a chunk, not of the weight (SD-v1.5's largest would otherwise take 0.5 GB beside the step)."""
    bits = code_bits(levels)
    per_word = 32 // bits
    n = codes.shape[0]
    rows = codes.reshape(n, -1)
    k = rows.shape[1]
    shifts = (torch.arange(per_word, device=codes.device) * bits).view(1, per_word, 1)
    words = torch.empty(k // per_word, n, dtype=torch.int32, device=codes.device)
    step = max(1, chunk_elements // max(k, 1))
    for first in range(0, n, step):
        k_major = rows[first : first + step].t().to(torch.int64)  # [K, outputs of the chunk]
        packed = (k_major.view(k // per_word, per_word, -1) << shifts).sum(dim=1)
        words[:, first : first + step] = torch.where(packed >= 2**31, packed - 2**32, packed)
    if isinstance(module, torch.nn.Conv2d):
        kernel, stride, padding = tuple(module.kernel_size), module.stride[0], module.padding[0]
        cin = module.in_channels
    else:
        kernel, stride, padding, cin = (1, 1), 1, 0, module.in_features
    return FusedWeight(
        words.contiguous(),
        scale.float().contiguous(),
        n,
        cin,
        kernel,
        stride,
        padding,
        bits,
        levels // 2,
    )


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes [N, K] held by words [K / per_word, N] (the inverse of fused_weight's packing)."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word, device=words.device) * bits).view(1, per_word, 1)
    codes = (words.to(torch.int64).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, words.shape[1]).t()
