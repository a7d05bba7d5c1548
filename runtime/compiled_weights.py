"""Low-bit weights decoded inside a ``torch.compile``'d UNet (the torch backend's ``compile`` mode).

The decode kernels of plugins_trt are registered as a PyTorch custom op, ``bf::lowbit_decode``
(``torch.library``, with a fake implementation that gives the output's shape and dtype), and every
quantized Conv2d / Linear becomes a ``CompiledLowBitLayer`` whose forward is "decode the weight,
then convolve or multiply". Dynamo traces the whole UNet through these layers without a graph
break; inductor fuses the elementwise work around the convolutions and matrix products (where an
FP16 step spends about half its time) and plans the decoded weights as short-lived buffers: each
is freed after its layer, so only the packed codes stay resident. The step is then replayed from
a CUDA graph, which also captures the decode launches.

Inside a UNet block (a ResNet, a transformer block, an attention's projections, a resampler) the
layers' weights are decoded together by one launch (``bf::lowbit_decode_group``) into one buffer
that lives while the block runs, and handed to the block's layers with ``torch.func.functional_call``:
a launch per block instead of per layer (about 60 instead of 258 on SD-v1.5). Layers outside such a
block decode alone.

The weights are the decode kernels' output bit for bit (the op runs the same kernel as the other
modes), so the compiled step differs from an eager step with the same decoded weights only where
inductor changes the order of floating-point work around them.
"""

from __future__ import annotations

import math
import re

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
    lib = _library()
    if codes.is_cuda:
        return lib.decode_cuda(codes, scale, s, out=torch.empty(s.shape, dtype=dtype, device=codes.device))
    # on the CPU (tests, tracing checks): the same decode through the library's CPU path, in float32
    return torch.from_numpy(lib.decode_cpu(codes.numpy(), scale.numpy(), s)).to(dtype)


@lowbit_decode.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, spec: int, dtype: torch.dtype) -> torch.Tensor:
    return codes.new_empty(_SPECS[spec].shape, dtype=dtype)


ALIGN = 128  # elements: every weight in a group's buffer starts 256-byte aligned, as cuDNN and cuBLAS like it

# The groups the op decodes, by id: (specs, offsets into the buffer, buffer length); one id per distinct
# list of specs, like spec_id, so building a model again adds nothing.
_GROUPS: list[tuple[tuple[DequantSpec, ...], tuple[int, ...], int]] = []
_GROUP_IDS: dict[tuple[DequantSpec, ...], int] = {}


def group_id(specs: tuple[DequantSpec, ...]) -> int:
    if specs not in _GROUP_IDS:
        offsets, total = [], 0
        for spec in specs:
            offsets.append(total)
            total += -(-math.prod(spec.shape) // ALIGN) * ALIGN
        _GROUP_IDS[specs] = len(_GROUPS)
        _GROUPS.append((specs, tuple(offsets), total))
    return _GROUP_IDS[specs]


@torch.library.custom_op("bf::lowbit_decode_group", mutates_args=())
def lowbit_decode_group(codes: list[torch.Tensor], scales: list[torch.Tensor], group: int, dtype: torch.dtype) -> torch.Tensor:
    """The weights of group ``group`` (see ``group_id``) decoded into one flat buffer, each at its offset."""
    specs, offsets, total = _GROUPS[group]
    flat = torch.empty(total, dtype=dtype, device=codes[0].device)
    outs = [flat[o : o + math.prod(spec.shape)].view(spec.shape) for spec, o in zip(specs, offsets, strict=True)]
    lib = _library()
    if codes[0].is_cuda:
        lib.decode_cuda_batch(list(zip(codes, scales, specs, strict=True)), outs)
    else:
        for c, sc, spec, out in zip(codes, scales, specs, outs, strict=True):
            out.copy_(torch.from_numpy(lib.decode_cpu(c.numpy(), sc.numpy(), spec)))
    return flat


@lowbit_decode_group.register_fake
def _(codes: list[torch.Tensor], scales: list[torch.Tensor], group: int, dtype: torch.dtype) -> torch.Tensor:
    return codes[0].new_empty(_GROUPS[group][2], dtype=dtype)


class CompiledLowBitGroup(nn.Module):
    """A block whose quantized layers' weights are decoded together, by one launch, on every call.

    The layers keep their place in the block with an empty placeholder weight; each call decodes the
    group's buffer and runs the block with views of it as those weights (``torch.func.functional_call``)."""

    def __init__(self, block: nn.Module, members: dict[str, object], dtype: torch.dtype):
        super().__init__()
        self.block = block
        self.names = list(members)
        packed = list(members.values())
        # plain attributes, not buffers: moving the model to float16 must not round the float32 scales
        self.codes, self.scales = [w.codes for w in packed], [w.scale for w in packed]
        self.layouts = [(math.prod(w.spec.shape), tuple(w.spec.shape), w.channels_last) for w in packed]
        self.group, self.dtype = group_id(tuple(w.spec for w in packed)), dtype
        self.offsets = _GROUPS[self.group][1]
        for name in self.names:
            block.get_submodule(name).weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, *args, **kwargs):
        flat = torch.ops.bf.lowbit_decode_group(self.codes, self.scales, self.group, self.dtype)
        weights = {}
        for name, offset, (n, shape, channels_last) in zip(self.names, self.offsets, self.layouts, strict=True):
            w = flat[offset : offset + n].view(shape)
            weights[f"{name}.weight"] = w.permute(0, 3, 1, 2) if channels_last else w
        return torch.func.functional_call(self.block, weights, args, kwargs)


# The blocks whose layers decode together: the innermost ResNet, transformer block, attention (its
# projections), or resampler a layer sits in, by its module name in a diffusers UNet.
_BLOCK = re.compile(r"^(.*\b(?:resnets|transformer_blocks|attentions|downsamplers|upsamplers)\.\d+)\.(.+)$")


def _library():
    lib = _DECODER[0]
    if lib is None:
        from bf.decode_kernels import load

        lib = _DECODER[0] = load()
    return lib


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


def compile_weights(owner: nn.Module, packed: dict, dtype: torch.dtype, decoder=None, by_block: bool = True) -> int:
    """Make every layer of ``owner`` named in ``packed`` (name -> bf.runtime.streamed_weights.PackedWeight, already on
    the device the model runs on) decode its weight from the codes on every call, in place; returns how many.

    ``by_block``: the layers of one block decode together (a CompiledLowBitGroup around the block), the rest
    alone (CompiledLowBitLayer); otherwise every layer alone."""
    if decoder is not None:
        _DECODER[0] = decoder
    for name, pw in packed.items():
        module = owner.get_submodule(name)
        stored = tuple(pw.spec.shape)
        expected = (stored[0], stored[3], stored[1], stored[2]) if pw.channels_last else stored
        if expected != tuple(module.weight.shape):
            raise BfError(f"compiled weights: {name} holds a {stored} weight, the model's is {tuple(module.weight.shape)}")
    groups: dict[str, dict] = {}
    alone = {}
    for name, pw in packed.items():
        m = _BLOCK.match(name) if by_block else None
        if m:
            groups.setdefault(m[1], {})[m[2]] = pw
        else:
            alone[name] = pw
    # innermost blocks first: wrapping a block moves what is below it (under .block), not what is above
    for block_name in sorted(groups, key=lambda n: -n.count(".")):
        parent_name, _, child = block_name.rpartition(".")
        parent = owner.get_submodule(parent_name) if parent_name else owner
        setattr(parent, child, CompiledLowBitGroup(getattr(parent, child), groups[block_name], dtype))
    for name, pw in alone.items():
        parent_name, _, child = name.rpartition(".")
        parent = owner.get_submodule(parent_name) if parent_name else owner
        setattr(parent, child, CompiledLowBitLayer(getattr(parent, child), pw.codes, pw.scale, pw.spec, pw.channels_last, dtype))
    return len(packed)


def packed_bytes(owner: nn.Module) -> int:
    """Resident bytes of the compiled layers' codes and scales."""
    total = 0
    for m in owner.modules():
        if isinstance(m, CompiledLowBitLayer):
            total += m.codes.nbytes + m.scale.nbytes
        elif isinstance(m, CompiledLowBitGroup):
            total += sum(c.nbytes for c in m.codes) + sum(c.nbytes for c in m.scales)
    return total


def decode_launches(owner: nn.Module) -> int:
    """Decode launches of one forward: one per block group and one per layer decoded alone."""
    return sum(isinstance(m, (CompiledLowBitGroup, CompiledLowBitLayer)) for m in owner.modules())
