"""Low-bit weights decoded inside a ``torch.compile``'d UNet (the torch backend's ``compile`` mode).

The decode kernels of plugins_trt are registered as a PyTorch custom op, ``bf::lowbit_decode``
(``torch.library``, with a fake implementation that gives the output's shape and dtype), and every
quantized Conv2d / Linear becomes a ``CompiledLowBitLayer`` whose forward is "decode the weight,
then convolve or multiply". Dynamo traces the whole UNet through these layers without a graph
break; inductor fuses the elementwise work around the convolutions and matrix products (where an
FP16 step spends about half its time) and plans the decoded weights as short-lived buffers: each
is freed after its layer, so only the packed codes stay resident. The step is then replayed from
a CUDA graph, which also captures the decode launches.

The weights are the decode kernels' output bit for bit (the op runs the same kernel as the other
modes), so the compiled step differs from an eager step with the same decoded weights only where
inductor changes the order of floating-point work around them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bf.errors import BfError
from bf.format.dequant_op import DequantSpec

# The specs the op decodes, by id: the op's schema takes plain ints, and the id keeps the grid,
# packing and stored shape out of the traced graph (a compiled graph only holds the number).
_SPECS: list[DequantSpec] = []
_SPEC_IDS: dict[DequantSpec, int] = {}


def spec_id(spec: DequantSpec) -> int:
    if spec not in _SPEC_IDS:
        _SPEC_IDS[spec] = len(_SPECS)
        _SPECS.append(spec)
    return _SPEC_IDS[spec]


_DECODER: list = [None]  # the decode library the op runs (None: bf.decode_kernels.load(), found as bf.native says)


@torch.library.custom_op("bf::lowbit_decode", mutates_args=())
def lowbit_decode(codes: torch.Tensor, scale: torch.Tensor, spec: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight of packed ``codes`` and per-row ``scale`` (spec ``spec``, see ``spec_id``), in its stored shape."""
    s = _SPECS[spec]
    lib = _DECODER[0]
    if lib is None:
        from bf.decode_kernels import load

        lib = _DECODER[0] = load()
    if codes.is_cuda:
        return lib.decode_cuda(codes, scale, s, out=torch.empty(s.shape, dtype=dtype, device=codes.device))
    # on the CPU (tests, tracing checks): the same decode through the library's CPU path, in float32
    return torch.from_numpy(lib.decode_cpu(codes.numpy(), scale.numpy(), s)).to(dtype)


@lowbit_decode.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, spec: int, dtype: torch.dtype) -> torch.Tensor:
    return codes.new_empty(_SPECS[spec].shape, dtype=dtype)


class CompiledLowBitLayer(nn.Module):
    """A Conv2d or Linear whose weight is decoded from its packed codes on every call, by the custom op."""

    def __init__(self, module: nn.Conv2d | nn.Linear, codes: torch.Tensor, scale: torch.Tensor, spec: DequantSpec, channels_last: bool,
                 dtype: torch.dtype):  # fmt: skip
        super().__init__()
        # plain attributes, not buffers: moving the model to float16 must not round the float32 scales
        self.codes, self.scale = codes, scale
        self.spec, self.channels_last, self.dtype = spec_id(spec), channels_last, dtype
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)
        self.conv = isinstance(module, nn.Conv2d)
        if self.conv:
            if module.padding_mode != "zeros":
                raise BfError(f"compiled low-bit layers support zero-padded convolutions, got padding_mode={module.padding_mode!r}")
            self.stride, self.padding, self.dilation, self.groups = module.stride, module.padding, module.dilation, module.groups
        self.shape = tuple(module.weight.shape)

    def weight(self) -> torch.Tensor:
        w = torch.ops.bf.lowbit_decode(self.codes, self.scale, self.spec, self.dtype)
        return w.permute(0, 3, 1, 2) if self.channels_last else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.conv:
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, w, self.bias)


def compile_weights(owner: nn.Module, packed: dict, dtype: torch.dtype, decoder=None) -> int:
    """Replace every layer of ``owner`` named in ``packed`` (name -> bf.runtime.streamed_weights.PackedWeight)
    by a CompiledLowBitLayer, in place; returns how many."""
    if decoder is not None:
        _DECODER[0] = decoder
    for name, pw in packed.items():
        parent_name, _, child = name.rpartition(".")
        parent = owner.get_submodule(parent_name) if parent_name else owner
        module = getattr(parent, child)
        stored = tuple(pw.spec.shape)
        expected = (stored[0], stored[3], stored[1], stored[2]) if pw.channels_last else stored
        if expected != tuple(module.weight.shape):
            raise BfError(f"compiled weights: {name} holds a {stored} weight, the model's is {tuple(module.weight.shape)}")
        setattr(parent, child, CompiledLowBitLayer(module, pw.codes, pw.scale, pw.spec, pw.channels_last, dtype))
    return len(packed)


def packed_bytes(owner: nn.Module) -> int:
    """Resident bytes of the compiled layers' codes and scales."""
    return sum(m.codes.nbytes + m.scale.nbytes for m in owner.modules() if isinstance(m, CompiledLowBitLayer))
