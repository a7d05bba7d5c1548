"""A quantized Conv2d or Linear inside a diffusers model: packed codes and float32 scales as buffers (loaded from
the checkpoint as they are, never cast), the weight decoded on every call, or once with ``keep_decoded``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bf.format import Grid, QuantizedLayer
from bf.format.dequant_op import DequantSpec
from bf.format.packing import Packing


class LowBitLayer(nn.Module):
    """Stands in for ``module`` (its bias and convolution settings kept); ``codes`` (uint8, the .bfq's packing) and
    ``scale`` (float32, one per output channel) are buffers created on ``device`` (meta while diffusers loads)."""

    def __init__(self, module: nn.Conv2d | nn.Linear, shape: tuple[int, ...], grid: Grid, keep_decoded: bool = False,
                 device: str | torch.device = "meta"):  # fmt: skip
        super().__init__()
        self.shape, self.grid, self.keep_decoded = tuple(shape), grid, keep_decoded
        self.register_buffer("codes", torch.empty(Packing.for_grid(grid).nbytes(self.shape), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(self.shape[0], dtype=torch.float32, device=device))
        self.bias = module.bias
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = module.stride, module.padding, module.dilation, module.groups
        self._decoded: torch.Tensor | None = None

    def decode(self) -> torch.Tensor:
        """The weight in float32 on the CPU (the format's rule), or in the bias' dtype on a GPU (the CUDA kernels)."""
        if self.codes.is_cuda:
            from bf.decode_kernels import load

            dtype = self.bias.dtype if self.bias is not None else torch.float16
            return load().decode_cuda(self.codes, self.scale, DequantSpec(self.shape, self.grid), dtype=dtype)
        layer = QuantizedLayer("", self.shape, self.grid, self.codes.numpy(), self.scale.numpy())
        return torch.from_numpy(np.ascontiguousarray(layer.dequantize()))

    def weight(self) -> torch.Tensor:
        if not self.keep_decoded:
            return self.decode()
        if self._decoded is None or self._decoded.device != self.codes.device:
            self._decoded = self.decode()
        return self._decoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight().to(x.dtype)
        if self.conv:
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{'conv' if self.conv else 'linear'} {list(self.shape)}, {self.grid.bits}-bit {self.grid.kind}"
