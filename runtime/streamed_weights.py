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
from bf.module_paths import parent_and_attribute


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

    def decode(self, decoder, flat: torch.Tensor) -> torch.Tensor:
        """Decoded (on the current stream) into the first numel elements of ``flat``: the module-shaped weight there."""
        decoder.decode_cuda(self.codes, self.scale, self.spec, out=flat[: self.numel].view(self.spec.shape))
        return self.view(flat)


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

    def __init__(self, weights: list[PackedWeight | None], dtype: torch.dtype = torch.float16, slots: int = 3, decoder=None,
                 group: bool = True, priority: int = 0, max_blocks: int = 0):  # fmt: skip
        if slots < 2:
            raise ValueError("a weight ring needs at least 2 slots (one computing, one decoding)")
        from bf.decode_kernels import load

        self.weights, self.slots, self.group, self.max_blocks = weights, slots, group, max_blocks
        self.lib = decoder or load()
        present = [w for w in weights if w is not None]  # None: a layer that does not decode through the ring
        self.dtype = dtype
        self.device = present[0].codes.device if present else torch.device("cuda", torch.cuda.current_device())
        self._allocate([w.numel for w in present])
        self.side = torch.cuda.Stream(self.device, priority=priority)  # -1: its blocks are scheduled first
        self.order: list[int] | None = None
        self._learning: list[int] = []
        self.pos = 0
        # layer index -> (up, down): a LoRA's change of its weight, added in the slot right after the decode, on the
        # stream that decodes (bf.lora_adapters.LoRAHooks.take_weight_deltas)
        self.deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _allocate(self, sizes: list[int]) -> None:
        self.capacity = _aligned(max(sizes, default=1))
        self.buffers = [torch.empty(self.capacity, dtype=self.dtype, device=self.device) for _ in range(self.slots)]

    def drop(self, index: int) -> None:
        """Layer ``index`` no longer takes its weight from the ring (a fused kernel reads its codes): free them.

        Only during the first forward, before the order is learned."""
        if self.order is not None:
            raise BfError("streamed weights: a layer can leave the ring only during the first forward")
        self.weights[index] = None

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @property
    def packed_bytes(self) -> int:
        """Resident bytes of the packed codes and scales the ring decodes."""
        return sum(w.codes.numel() + w.scale.numel() * w.scale.element_size() for w in self.weights if w is not None)

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
        if len(ws) == 1 and not self.max_blocks:
            self.lib.decode_cuda(ws[0].codes, ws[0].scale, ws[0].spec, out=outs[0])
        else:
            self.lib.decode_cuda_batch([(w.codes, w.scale, w.spec) for w in ws], outs, self.max_blocks)
        for k, out in zip(self.groups[g], outs, strict=True):
            self._add_delta(self.order[k], out)

    def _add_delta(self, index: int, stored: torch.Tensor) -> None:
        if index in self.deltas:
            up, down = self.deltas[index]
            stored.view(up.shape[0], -1).addmm_(up, down)

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

    def decode_alone(self, index: int) -> torch.Tensor:
        """Layer ``index``'s weight decoded on the current stream into the first slot (first forward only)."""
        w = self.weights[index]
        weight = w.decode(self.lib, self.buffers[0])  # a view of the slot: the change below shows through it
        self._add_delta(index, self.buffers[0][: w.numel])
        return weight

    def acquire(self, index: int) -> torch.Tensor:
        """The decoded weight of layer ``index`` (called by the layer, in its forward)."""
        w = self.weights[index]
        if self.order is None:
            self._learning.append(index)
            return self.decode_alone(index)
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
            sizes = [self.weights[i].numel for i in self.order]
            if _aligned(max(sizes, default=1)) < self.capacity:  # the largest weights went to fused kernels
                self._allocate(sizes)
            self._plan(self.order)
        else:
            if self.pos != len(self.order):
                raise BfError(f"streamed weights: a forward ran {self.pos} layers, the learned order has {len(self.order)}")
            torch.cuda.current_stream().wait_stream(self.side)


class StreamedLayer(nn.Module):
    """A Conv2d or Linear whose weight the ring decodes just before each call, or whose codes a
    fused kernel reads directly (bf.runtime.lowbit_gemm).

    With ``fused`` given, the layer picks in its first call (the ring's learning forward, on
    that call's input): the fastest of the fused kernel's tile configurations, and, when
    ``fused_mode`` is "auto", that only if it beats decoding the weight and running cuDNN /
    cuBLAS on it. Each candidate is timed as a CUDA graph of a few back-to-back calls. A layer
    that goes fused leaves the ring; one that does not drops its fused codes. The choice holds
    for every later input shape (``chosen_for`` records the one it was made on), so make the
    first forward the shape that matters."""

    def __init__(self, module: nn.Conv2d | nn.Linear, ring: WeightRing, index: int, fused=None, fused_mode: str = "auto"):
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
        self.fused, self.fused_mode = fused, fused_mode
        self.decoded: torch.Tensor | None = None  # the weight, decoded once and kept (see stream_weights' keep_decoded_bytes)
        self.config = None  # the fused kernel's tile configuration, once chosen
        self._run_fused = None  # lowbit_forward bound to the codes and that configuration
        self.timings: dict[str, float] = {}  # what the choice measured, in ms per call
        self.chosen_for: tuple[int, ...] = ()  # the input shape it measured

    def _streamed(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x, self.ring.acquire(self.index), self.bias)
        self.ring.release(self.index)
        return y

    def _choose(self, x: torch.Tensor) -> None:
        from bf.runtime.lowbit_gemm import CONFIGS, lowbit_forward, tile_times
        from bf.runtime.torch_graph import graph_time_ms

        if torch.cuda.is_current_stream_capturing():
            raise BfError("streamed weights: the first forward picks kernels and cannot run under CUDA graph capture")
        fw = self.fused
        self.chosen_for = tuple(x.shape)
        times = tile_times(x, fw, CONFIGS, self.bias)
        if not times:
            raise BfError(f"streamed weights: no tile configuration of the fused kernel runs layer {self.index} on this GPU")
        self.timings = {cfg.name: ms for cfg, ms in times.items()}
        best = min(times, key=times.get)
        if self.fused_mode == "auto":
            self.timings["decode+op"] = graph_time_ms(lambda: self.op(x, self.ring.decode_alone(self.index), self.bias))
            if self.timings["decode+op"] <= times[best]:
                self.fused = None
                return
        self.config = best
        self._run_fused = functools.partial(lowbit_forward, fw=fw, cfg=self.config)
        self.ring.drop(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoded is not None:
            return self.op(x, self.decoded, self.bias)
        if self.fused is not None and self.config is None:
            self._choose(x)
        if self.config is not None:
            return self._run_fused(x, bias=self.bias)
        return self._streamed(x)


class RingForward(nn.Module):
    """Wraps a module so every forward begins and ends its weight ring."""

    def __init__(self, module: nn.Module, ring: WeightRing):
        super().__init__()
        self.module, self.ring = module, ring

    def _layers(self) -> list[StreamedLayer]:
        return [m for m in self.module.modules() if isinstance(m, StreamedLayer)]

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of the quantized layers' weights: packed codes and scales the ring decodes,
        weights kept decoded, and the fused layers' words (before the first forward, fusable layers hold both)."""
        fused = sum(m.fused.nbytes for m in self._layers() if m.fused is not None)
        return self.ring.packed_bytes + self.kept_decoded_bytes + fused

    @property
    def kept_decoded_bytes(self) -> int:
        """Bytes of the weights kept decoded (stream_weights' keep_decoded_bytes)."""
        return sum(m.decoded.nbytes for m in self._layers() if m.decoded is not None)

    @property
    def fused_layers(self) -> int:
        """Layers that run the fused low-bit kernel (known after the first forward)."""
        return sum(1 for m in self._layers() if m.config is not None)

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
    fused: str = "off", keep_decoded_bytes: int = 0, priority: int = 0, decode_blocks: int = 0, lora=None,
) -> RingForward:  # fmt: skip
    """``root`` wrapped to run with its weight ring, after replacing (in place) every Conv2d /
    Linear of ``owner`` named in ``layers`` (see quantized_modules) by a streamed one.

    ``fused``: "off" decodes every weight into the ring; "on" runs every layer the fused
    low-bit kernel can take (bf.runtime.lowbit_gemm; float16, convolutions channels-last) on
    it; "auto" does so only where the first forward measures it faster (see StreamedLayer).

    ``keep_decoded_bytes``: bytes of decoded weights to keep resident instead of decoding them every
    forward, largest weights first (memory for speed: what is kept is not decoded again, and
    leaves the ring). ``priority``: the decode stream's CUDA priority (-1: high). ``decode_blocks``:
    cap on each decode launch's grid (0: none), so decoding shares the GPU with the compute
    kernels instead of taking every multiprocessor while it runs. ``lora`` (bf.lora_adapters.LoRAHooks): with
    ``fused`` off, the branches on the ring's layers are added to their weights in the slots, after each decode; the
    others stay for its ``register``.

    The replaced modules' full-precision weights are dropped, so move the result to the GPU
    afterwards; its ``ring`` holds the packed weights and the decode buffers."""
    if fused not in ("off", "on", "auto"):
        raise BfError(f"streamed weights: fused must be off, on or auto, got {fused!r}")
    if fused != "off" and dtype != torch.float16:
        raise BfError("streamed weights: the fused low-bit kernel runs float16 models only")
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
    # the budget is in bytes; the weights are counted in elements of the decoded dtype
    keep = largest_within({i: w.numel for i, w in enumerate(entries)}, keep_decoded_bytes // torch.tensor([], dtype=dtype).element_size())
    ring = WeightRing([None if i in keep else w for i, w in enumerate(entries)], dtype=dtype, slots=slots, decoder=decoder, group=group,
                      priority=priority, max_blocks=decode_blocks)  # fmt: skip
    for index, (name, module) in enumerate(modules.items()):
        parent, child = parent_and_attribute(owner, name)
        w = entries[index]
        fw = fused_codes(module, w, ring.lib) if fused != "off" and index not in keep and fusable_layer(module, w) else None
        layer = StreamedLayer(module, ring, index, fw, fused)
        if index in keep:
            layer.decoded = w.decode(ring.lib, torch.empty(w.numel, dtype=dtype, device=w.codes.device))
        setattr(parent, child, layer)
    if lora is not None and fused == "off":  # a fused kernel reads the codes, not the slot: its layer keeps the hook
        index_of = {name: i for i, name in enumerate(modules) if ring.weights[i] is not None}
        deltas = lora.take_weight_deltas({name: entries[i].channels_last for name, i in index_of.items()})
        ring.deltas = {index_of[name]: d for name, d in deltas.items()}
    return RingForward(root, ring)


def largest_within(sizes: dict, budget: int) -> set:
    """Keys of the largest items (``sizes``: key -> element count) whose elements add up to at most ``budget``;
    ties keep ``sizes``' order. How every mode that keeps weights decoded picks them."""
    return _within(sorted(sizes, key=lambda k: -sizes[k]), sizes, budget)


def smallest_within(sizes: dict, budget: int) -> set:
    """Keys of the smallest items whose elements add up to at most ``budget`` (the weights whose decodes are mostly
    launches: benchmarks/sd15_compiled_step.py --ahead-keep)."""
    return _within(sorted(sizes, key=lambda k: sizes[k]), sizes, budget)


def _within(keys: list, sizes: dict, budget: int) -> set:
    keep, used = set(), 0
    for key in keys:
        if used + sizes[key] <= budget:
            keep.add(key)
            used += sizes[key]
    return keep


def integer_codes(w: PackedWeight, decoder) -> torch.Tensor:
    """A packed weight's codes (0 .. levels-1) as uint8 of its stored shape, decoded on the GPU with unit scales."""
    out = torch.empty(w.spec.shape, dtype=torch.float16, device=w.codes.device)
    decoder.decode_cuda(w.codes, torch.ones_like(w.scale), w.spec, out=out)
    return out.add_(w.spec.grid.levels // 2).round_().to(torch.uint8)  # integers to 255 are exact in float16


def fusable_layer(module: nn.Module, w: PackedWeight) -> bool:
    """Whether the fused kernel (bf.runtime.lowbit_gemm) can run ``module`` on ``w``'s codes."""
    from bf.runtime.fused_layout import fusable

    if isinstance(module, nn.Conv2d) and not w.channels_last:
        return False  # the kernel reads NHWC input and (kh, kw, in)-ordered rows
    return fusable(module, w.spec.grid.levels) is None


def fused_codes(module: nn.Conv2d | nn.Linear, w: PackedWeight, decoder):
    """``w``'s codes in the fused kernel's layout (bf.runtime.fused_layout.FusedWeight), read back on the GPU."""
    from bf.runtime.fused_layout import fused_weight

    return fused_weight(integer_codes(w, decoder), w.scale, module, w.spec.grid.levels)
