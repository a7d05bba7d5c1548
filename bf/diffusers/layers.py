"""A quantized Conv2d or Linear inside a diffusers model: packed codes and float32 scales as buffers (loaded from
the checkpoint as they are, never cast), the weight decoded on every call, or once with ``keep_decoded``.

The layers are nn.Linear / nn.Conv2d subclasses (without their weight parameter), so that what dispatches on
those types, peft's LoRA injection first, takes them: a LoRA then runs as a low-rank branch beside the low-bit
layer. Their ``weight`` is a shape-only stand-in (one zero, expanded to the weight's shape, on the codes' device,
in the bias' dtype), which tells such code the shape, device and dtype without a decoded copy; the layer computes
with the decoded weight, never with it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bf.format import Grid, QuantizedLayer
from bf.format.dequant_op import DequantSpec
from bf.format.packing import Packing


class LowBitLayer(nn.Module):
    """What LowBitLinear and LowBitConv2d share: ``codes`` (uint8, the .bfq's packing) and ``scale`` (float32, one
    per output channel) buffers created on ``device`` (meta while diffusers loads), and the decode."""

    def _init_low_bit(self, module: nn.Module, shape: tuple[int, ...], grid: Grid, keep_decoded: bool, device) -> None:
        self.shape, self.grid, self.keep_decoded = tuple(shape), grid, keep_decoded
        self.register_buffer("codes", torch.empty(Packing.for_grid(grid).nbytes(self.shape), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(self.shape[0], dtype=torch.float32, device=device))
        self.bias = module.bias
        self._decoded: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return torch.zeros((), dtype=dtype, device=self.codes.device).expand(self.shape)

    def decode(self) -> torch.Tensor:
        """The weight in float32 on the CPU (the format's rule), or in the bias' dtype on a GPU (the CUDA kernels)."""
        if self.codes.is_cuda:
            from bf.decode_kernels import load

            dtype = self.bias.dtype if self.bias is not None else torch.float16
            return load().decode_cuda(self.codes, self.scale, DequantSpec(self.shape, self.grid), dtype=dtype)
        layer = QuantizedLayer("", self.shape, self.grid, self.codes.numpy(), self.scale.numpy())
        return torch.from_numpy(np.ascontiguousarray(layer.dequantize()))

    def decoded_weight(self) -> torch.Tensor:
        if not self.keep_decoded:
            return self.decode()
        if self._decoded is None or self._decoded.device != self.codes.device:
            self._decoded = self.decode()
        return self._decoded

    def extra_repr(self) -> str:
        return f"{list(self.shape)}, {self.grid.bits}-bit {self.grid.kind}"


class LowBitLinear(LowBitLayer, nn.Linear):
    def __init__(self, module: nn.Linear, shape, grid: Grid, keep_decoded: bool = False, device="meta"):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate the weight
        self.in_features, self.out_features = module.in_features, module.out_features
        self._init_low_bit(module, shape, grid, keep_decoded, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.decoded_weight().to(x.dtype), self.bias)


class LowBitConv2d(LowBitLayer, nn.Conv2d):
    def __new__(cls, *args, **kwargs):
        # peft builds a LoRA's convolutions as type(base_layer)(in, out, kernel, ...): those are plain convolutions
        if args and not isinstance(args[0], nn.Module):
            return nn.Conv2d(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, module: nn.Conv2d, shape, grid: Grid, keep_decoded: bool = False, device="meta"):
        nn.Module.__init__(self)  # not nn.Conv2d's: it would allocate the weight
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups", "padding_mode", "_reversed_padding_repeated_twice"):  # fmt: skip
            setattr(self, attr, getattr(module, attr))
        self._init_low_bit(module, shape, grid, keep_decoded, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.decoded_weight().to(x.dtype), self.bias)


def low_bit_layer(module: nn.Module, shape, grid: Grid, keep_decoded: bool = False, device="meta") -> LowBitLayer:
    """The low-bit stand-in for a Conv2d or Linear ``module``."""
    kind = LowBitConv2d if isinstance(module, nn.Conv2d) else LowBitLinear
    return kind(module, shape, grid, keep_decoded, device)
