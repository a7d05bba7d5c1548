"""Quantized UNet weights kept packed on the GPU and decoded layer by layer, just before each
layer runs, into a small ring of reused buffers (the torch backend's low-memory mode).

Only the packed codes and scales stay resident (about 1/8 of the FP16 weights). Decoding runs
on a side stream a few slots ahead of the compute stream (a slot holds one large weight or a
run of consecutive small ones, decoded by one launch): slot k is filled while slots
k-S+1 .. k-1 compute, and reused once its layers have run, so in a CUDA graph the decode
kernels can overlap the convolutions and matrix products. Events order
the two streams; the same code runs eagerly and under graph capture.

Conv weights can be stored with their rows permuted to (kh, kw, in) order: decoded, they are
already the channels-last tensor cuDNN's NHWC kernels read, so the convolution does not copy
the weight into that layout on every call.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bf.errors import BfError
from bf.format import QuantizedLayer
from bf.format.dequant_op import DequantSpec
from bf.format.packing import Packing, pack_codes, unpack_codes


@dataclass
class PackedWeight:
    """One weight as it lives on the GPU: packed codes, scales and the spec of the stored layout."""

    codes: torch.Tensor  # uint8, CUDA
    scale: torch.Tensor  # float32, CUDA
    spec: DequantSpec  # the stored shape: (O, I) or (O, I, kh, kw), or (O, kh, kw, I) when channels_last
    channels_last: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.spec.shape)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The module-shaped weight over the first numel elements of a buffer."""
        w = flat[: self.numel].view(self.spec.shape)
        return w.permute(0, 3, 1, 2) if self.channels_last else w


def channels_last_codes(layer: QuantizedLayer) -> np.ndarray:
    """A conv layer's codes with each row in (kh, kw, in) order instead of (in, kh, kw).

    Levels and per-row scales are unchanged; only their order within a row moves, so the decode
    of the result is the channels-last copy of the layer's weight, bit for bit."""
    if len(layer.shape) != 4:
        raise ValueError(f"{layer.name}: channels-last order is for 4-d conv weights, got {layer.shape}")
    packing = Packing.for_grid(layer.grid)
    codes = unpack_codes(layer.codes, layer.shape, packing)
    return pack_codes(np.ascontiguousarray(codes.transpose(0, 2, 3, 1)), packing)


def packed_weight(layer: QuantizedLayer, device: str, channels_last: bool) -> PackedWeight:
    cl = channels_last and len(layer.shape) == 4
    codes = channels_last_codes(layer) if cl and layer.shape[2:] != (1, 1) else layer.codes  # 1x1: the same row order
    o, i, *k = layer.shape
    shape = (o, *k, i) if cl else layer.shape
    return PackedWeight(
        torch.from_numpy(np.ascontiguousarray(codes)).to(device),
        torch.from_numpy(np.ascontiguousarray(layer.scale, dtype=np.float32)).to(device),
        DequantSpec(tuple(shape), layer.grid),
        cl,
    )


ALIGN = 128  # elements: every weight in a slot starts 256-byte aligned, as cuDNN and cuBLAS like it


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class WeightRing:
    """Decodes weights into ``slots`` reused buffers, ``slots - 1`` groups ahead of their use.

    The first forward learns the order the layers run in (decoding each on the compute
    stream as it comes). The order is then cut into groups of consecutive layers that fit
    one slot (the largest weight's size), each decoded by one batched launch: hundreds of
    small attention weights cost a few launches, not one each. Later forwards prefetch the
    groups on the side stream and check that the order holds."""

    def __init__(self, weights: list[PackedWeight], dtype: torch.dtype = torch.float16, slots: int = 3, decoder=None,
                 group: bool = True):  # fmt: skip
        if slots < 2:
            raise ValueError("a weight ring needs at least 2 slots (one computing, one decoding)")
        from bf.decode_kernels import load

        self.weights, self.slots, self.group = weights, slots, group
        self.lib = decoder or load()
        device = weights[0].codes.device
        self.capacity = _aligned(max(w.numel for w in weights))
        self.buffers = [torch.empty(self.capacity, dtype=dtype, device=device) for _ in range(slots)]
        self.side = torch.cuda.Stream(device)
        self.order: list[int] | None = None
        self._learning: list[int] = []
        self.pos = 0

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def _plan(self, order: list[int]) -> None:
        """Groups of consecutive positions, each position's group and its offset in the group's slot."""
        self.groups: list[list[int]] = []
        self.group_of, self.offset_of = [], []
        used = self.capacity
        for k, index in enumerate(order):
            n = _aligned(self.weights[index].numel)
            if not self.group or used + n > self.capacity:
                self.groups.append([])
                used = 0
            self.groups[-1].append(k)
            self.group_of.append(len(self.groups) - 1)
            self.offset_of.append(used)
            used += n
        self.ready = [torch.cuda.Event() for _ in self.groups]
        self.done = [torch.cuda.Event() for _ in self.groups]
        self.start = torch.cuda.Event()

    def _view(self, k: int) -> torch.Tensor:
        """Where position k's weight lives in its group's slot (its stored layout)."""
        buf = self.buffers[self.group_of[k] % self.slots]
        return buf[self.offset_of[k] :]

    def _decode_group(self, g: int) -> None:
        """One launch for the group's weights, into their places in its slot, on the current stream."""
        ws = [self.weights[self.order[k]] for k in self.groups[g]]
        outs = [self._view(k)[: w.numel].view(w.spec.shape) for k, w in zip(self.groups[g], ws, strict=True)]
        if len(ws) == 1:
            self.lib.decode_cuda(ws[0].codes, ws[0].scale, ws[0].spec, out=outs[0])
        else:
            self.lib.decode_cuda_batch([(w.codes, w.scale, w.spec) for w in ws], outs)

    def decode_all(self) -> None:
        """Every group in order on the current stream, nothing else (what a forward's decoding costs alone)."""
        for g in range(len(self.groups)):
            self._decode_group(g)

    def _prefetch(self, g: int) -> None:
        if g >= len(self.groups):
            return
        with torch.cuda.stream(self.side):
            if g >= self.slots:  # the slot's previous group must have run
                self.side.wait_event(self.done[g - self.slots])
            self._decode_group(g)
            self.ready[g].record(self.side)

    def begin(self) -> None:
        """Before a forward: start decoding the first groups (after everything queued so far)."""
        self.pos = 0
        if self.order is None:
            self._learning = []
            return
        self.start.record()
        self.side.wait_event(self.start)
        for g in range(self.slots - 1):
            self._prefetch(g)

    def acquire(self, index: int) -> torch.Tensor:
        """The decoded weight of layer ``index`` (called by the layer, in its forward)."""
        w = self.weights[index]
        if self.order is None:
            self._learning.append(index)
            self.lib.decode_cuda(w.codes, w.scale, w.spec, out=self.buffers[0][: w.numel].view(w.spec.shape))
            return w.view(self.buffers[0])
        k = self.pos
        if k >= len(self.order) or self.order[k] != index:
            raise BfError(f"streamed weights: layer {index} ran at position {k}, off the learned order; layers must run in a fixed order")
        g = self.group_of[k]
        if k == self.groups[g][0]:
            self._prefetch(g + self.slots - 1)
            torch.cuda.current_stream().wait_event(self.ready[g])
        return w.view(self._view(k))

    def release(self, index: int) -> None:
        if self.order is not None and self.pos == self.groups[self.group_of[self.pos]][-1]:
            self.done[self.group_of[self.pos]].record()
        self.pos += 1

    def end(self) -> None:
        """After a forward: the first one fixes the order; later ones join the side stream back."""
        if self.order is None:
            self.order = self._learning
            self._plan(self.order)
        else:
            if self.pos != len(self.order):
                raise BfError(f"streamed weights: a forward ran {self.pos} layers, the learned order has {len(self.order)}")
            torch.cuda.current_stream().wait_stream(self.side)


class StreamedLayer(nn.Module):
    """A Conv2d or Linear whose weight the ring decodes just before each call."""

    def __init__(self, module: nn.Conv2d | nn.Linear, ring: WeightRing, index: int):
        super().__init__()
        self.ring, self.index = ring, index
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise BfError(f"streamed weights support zero-padded convolutions, got padding_mode={module.padding_mode!r}")
            self.op = functools.partial(F.conv2d, stride=module.stride, padding=module.padding, dilation=module.dilation,
                                        groups=module.groups)  # fmt: skip
        else:
            self.op = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x, self.ring.acquire(self.index), self.bias)
        self.ring.release(self.index)
        return y


class RingForward(nn.Module):
    """Wraps a module so every forward begins and ends its weight ring."""

    def __init__(self, module: nn.Module, ring: WeightRing):
        super().__init__()
        self.module, self.ring = module, ring

    def forward(self, *args, **kwargs):
        self.ring.begin()
        out = self.module(*args, **kwargs)
        self.ring.end()
        return out


def quantized_modules(owner: nn.Module, names) -> dict[str, nn.Conv2d | nn.Linear]:
    """The Conv2d / Linear modules of ``owner`` that the named quantized layers belong to.

    Layers that ``owner`` no longer has, or has as weightless stand-ins (the time-embedding
    layers and projections a time-feature table replaced), are left out."""
    found = {}
    for name in names:
        try:
            module = owner.get_submodule(name)
        except AttributeError:
            continue
        if not hasattr(module, "weight"):
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise BfError(f"{name} is a {type(module).__name__}, not a Conv2d or Linear")
        found[name] = module
    return found


def stream_weights(
    root: nn.Module, owner: nn.Module, layers: dict[str, QuantizedLayer | PackedWeight], *, device: str = "cuda",
    dtype: torch.dtype = torch.float16, channels_last: bool = False, slots: int = 3, decoder=None, group: bool = True,
) -> RingForward:  # fmt: skip
    """``root`` wrapped to run with its weight ring, after replacing (in place) every Conv2d /
    Linear of ``owner`` named in ``layers`` (see quantized_modules) by a streamed one.

    The replaced modules' full-precision weights are dropped, so move the result to the GPU
    afterwards; its ``ring`` holds the packed weights and the decode buffers."""
    modules = quantized_modules(owner, layers)
    if not modules:
        raise BfError("streamed weights: none of the quantized layers is in the model")
    entries = []
    for name, module in modules.items():
        layer = layers[name]
        pw = layer if isinstance(layer, PackedWeight) else packed_weight(layer, device, channels_last)
        if tuple(pw.view(torch.empty(pw.numel, device="meta")).shape) != tuple(module.weight.shape):
            raise BfError(f"streamed weights: {name} holds a {pw.spec.shape} weight, the model's is {tuple(module.weight.shape)}")
        entries.append(pw)
    ring = WeightRing(entries, dtype=dtype, slots=slots, decoder=decoder, group=group)
    for index, (name, module) in enumerate(modules.items()):
        parent_name, _, child = name.rpartition(".")
        parent = owner.get_submodule(parent_name) if parent_name else owner
        setattr(parent, child, StreamedLayer(module, ring, index))
    return RingForward(root, ring)
