"""The PyTorch modules an export traces: quantized layers as dequant-op nodes, the UNet by step index.

Each quantized Conv2d / Linear becomes a module whose weight is the output of
``LowBitDequant`` over its packed codes and scales. In PyTorch the op returns the weight
decoded once by the format's reference decoder (so the traced model computes exactly what
the checkpoint says); in ONNX it is one ``bitsfusion::LowBitDequant`` node whose inputs are
the packed bytes, so the graph stores the packed size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bf.format import QuantizedLayer
from bf.format.dequant_op import DOMAIN, DTYPES, OP_TYPE, DequantSpec
from bf.module_paths import parent_and_attribute

ONNX_DTYPES = {getattr(torch, name): code for code, name in DTYPES.items()}  # the op's output dtype attribute


class LowBitDequant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor, owner: LowBitWeight) -> torch.Tensor:
        return owner.decoded

    @staticmethod
    def symbolic(g, codes, scale, owner: LowBitWeight):
        attrs = owner.spec().attributes()
        out = g.op(
            f"{DOMAIN}::{OP_TYPE}",
            codes,
            scale,
            bits_i=attrs["bits"],
            grid_s=attrs["grid"],
            levels_i=attrs["levels"],
            per_field_i=attrs["per_field"],
            field_bits_i=attrs["field_bits"],
            shape_i=attrs["shape"],
            dtype_i=attrs["dtype"],
        )
        out.setType(codes.type().with_dtype(owner.decoded.dtype).with_sizes(list(owner.shape)))
        return out


class LowBitWeight(nn.Module):
    """Packed codes and scales of one weight; ``forward()`` is the weight (float32: graphs are float32)."""

    def __init__(self, layer: QuantizedLayer):
        super().__init__()
        self.shape, self.grid = layer.shape, layer.grid
        self.register_buffer("codes", torch.from_numpy(layer.codes.copy()))
        self.register_buffer("scale", torch.from_numpy(layer.scale.copy()))
        self.decoded = torch.from_numpy(layer.dequantize())  # not a buffer: never stored in a graph

    def spec(self) -> DequantSpec:
        return DequantSpec(self.shape, self.grid, ONNX_DTYPES[self.decoded.dtype])

    def forward(self) -> torch.Tensor:
        return LowBitDequant.apply(self.codes, self.scale, self)


def _frozen_bias(module: nn.Module) -> nn.Parameter | None:
    return None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)


class LowBitConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, layer: QuantizedLayer):
        super().__init__()
        self.weight_op = LowBitWeight(layer)
        self.bias = _frozen_bias(conv)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight_op(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class LowBitLinear(nn.Module):
    def __init__(self, linear: nn.Linear, layer: QuantizedLayer):
        super().__init__()
        self.weight_op = LowBitWeight(layer)
        self.bias = _frozen_bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_op(), self.bias)


def swap_quantized_layers(unet: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
    """Replace (in place) every quantized Conv2d / Linear of ``unet`` by its low-bit module."""
    for name, layer in layers.items():
        parent, child = parent_and_attribute(unet, name)
        old = getattr(parent, child)
        if isinstance(old, nn.Conv2d):
            new = LowBitConv2d(old, layer)
        elif isinstance(old, nn.Linear):
            new = LowBitLinear(old, layer)
        else:
            raise TypeError(f"{name}: a quantized layer must be Conv2d or Linear, got {type(old).__name__}")
        setattr(parent, child, new)
