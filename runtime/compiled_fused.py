"""Quantized layers whose codes a fused kernel reads inside a ``torch.compile``'d step, instead of decoding their
weights into FP16 first (bf.runtime.compiled_weights): the Triton kernel (bf.runtime.lowbit_gemm) on any CUDA GPU,
and on Hopper (sm_90, Triton 3.6 with Gluon) also the warp-specialized TMA kernel (bf.runtime.lowbit_wgmma).

A decoded weight costs its FP16 bytes twice, written then read; a fused kernel reads only the codes. Where a
layer's weight outweighs its compute (SD-v1.5's 3x3 convolutions at the 8x8 latents: 29.5 MB of FP16 weight for
128 output pixels a batch of 2), that is the layer's whole cost: there the TMA kernel runs in about 0.63-0.64x the time
cuDNN takes on the FP16 weight, and at the 16x16 latents about as fast as cuDNN. Where the compute dominates (the
32x32 and 64x64 latents, the large linear layers), cuDNN / cuBLAS on a decoded weight are faster. ``choose_fused``
times the kernels on each layer's input shape from one forward against what the layer would cost the step decoded:
cuDNN / cuBLAS as the compiled step runs them, plus the weight's share of the step's batched decode. (Timing a
layer's decode as a launch of its own instead fused SD-v1.5's 1x1 convolutions and linear layers, which the kernel
runs in about twice cuBLAS's time, and made the step slower. Taking slower fused layers for
the decode they leave out, ``margin`` above 1, made SD-v1.5's step that decodes ahead slower: the kernel's extra
time is on the step's chain, while the decode it saves was partly hidden beside it.)

The kernels are registered as one PyTorch custom op (``bf::lowbit_fused_layer``, with a fake implementation that
gives the output's shape and layout), so dynamo traces the UNet through it and the step's CUDA graph captures it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from bf.errors import BfError
from bf.runtime.tma_tiles import CONFIGS as WGMMA_CONFIGS
from bf.runtime.tma_tiles import WgmmaConfig, unsupported

# The tile configurations tried per layer (bf.runtime.lowbit_gemm.TileConfig fields; splits 0: one tile per
# multiprocessor): the tiles that won SD-v1.5's 8x8 layers in a wider search (benchmarks/sd15_layer_paths.py --fused).
CANDIDATES = (
    dict(block_m=128, block_n=128, block_k=128, warps=8, stages=3, splits=0),
    dict(block_m=128, block_n=128, block_k=64, warps=8, stages=3, splits=0),
    dict(block_m=64, block_n=128, block_k=64, warps=4, stages=4, splits=0),
    dict(block_m=64, block_n=64, block_k=64, warps=4, stages=4, splits=0),
)

# What choose_fused times the fused kernel against (see there).
AGAINST = ("stream", "decode", "fp16")

# The fused layers by id: (FusedWeight without its tensors, TileConfig). The op's schema takes an int; the id
# keeps the layer's geometry and tile out of the traced graph. Ids are per process, so inductor's on-disk cache can
# serve a graph made in another process only where every op's tensors have the same shapes.
_LAYERS: list[tuple] = []
_LAYER_IDS: dict[tuple, int] = {}


def _layer_id(fw, cfg) -> int:
    shape = dataclasses.replace(fw, words=None, scale=None)
    key = (*(getattr(shape, f.name) for f in dataclasses.fields(shape)), cfg)
    if key not in _LAYER_IDS:
        _LAYER_IDS[key] = len(_LAYERS)
        _LAYERS.append((shape, cfg))
    return _LAYER_IDS[key]


# needs_fixed_stride_order: inductor hands the kernel its input in the strides eager gives it (channels-last in a
# channels-last model), instead of a layout the kernel would first copy into NHWC.
@torch.library.custom_op("bf::lowbit_fused_layer", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def lowbit_fused_layer(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, layer: int) -> torch.Tensor:
    """Layer ``layer`` (see ``_layer_id``) on ``x``: the fused kernel over its codes ``words`` and scales (on the CPU,
    for tests and tracing checks: the same layer on the weight the codes make, in ``x``'s dtype)."""
    shape, cfg = _LAYERS[layer]
    fw = dataclasses.replace(shape, words=words, scale=scale)
    if not x.is_cuda:
        return _reference(x, fw, bias)
    return _forward(x, fw, cfg, bias)


def _forward(x: torch.Tensor, fw, cfg, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer by the kernel ``cfg`` is a tile of: the Hopper TMA kernel (WgmmaConfig) or the Triton kernel
    (TileConfig). A TMA tile chosen at one input shape may not take another (a tile is whole image rows: 128 pixels
    are no whole rows of a 12-pixel-wide latent); that input runs on the Triton kernel's first tile."""
    if isinstance(cfg, WgmmaConfig):
        if not unsupported(tuple(x.shape), fw, cfg):
            from bf.runtime.lowbit_wgmma import wgmma_forward

            return wgmma_forward(x, fw, cfg, bias)
        from bf.runtime.lowbit_gemm import TileConfig

        cfg = TileConfig(**CANDIDATES[0])
    from bf.runtime.lowbit_gemm import lowbit_forward

    return lowbit_forward(x, fw, cfg, bias)


@functools.cache
def _gluon_for_hopper() -> bool:
    """Triton 3.6 with Gluon: the experimental API the TMA kernel is written and verified against (it changes between
    releases)."""
    try:
        import triton
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:
        return False
    return tuple(int(v) for v in triton.__version__.split(".")[:2]) == (3, 6)


def _wgmma_configs(x: torch.Tensor, fw) -> list:
    """The Hopper TMA kernel's tiles that take this layer on ``x``: on an sm_90 GPU with Triton 3.6 (none elsewhere)."""
    if torch.cuda.get_device_capability(x.device)[0] != 9 or not _gluon_for_hopper():
        return []
    return [c for c in WGMMA_CONFIGS if not unsupported(tuple(x.shape), fw, c)]


def _wgmma_times(x: torch.Tensor, fw, bias: torch.Tensor | None, log: Callable[[str], None]) -> dict:
    """Milliseconds per call of the TMA kernel's tiles that take this layer. A tile that fails to compile or run is
    left out, logged (Gluon is experimental: the Triton kernel's tiles stay)."""
    from bf.runtime.lowbit_gemm import tile_times

    times = {}
    for cfg in _wgmma_configs(x, fw):
        try:
            times |= tile_times(x, fw, [cfg], bias, forward=_forward)
        except Exception as e:
            log(f"fused layers: the TMA kernel's tile {cfg.name} failed ({type(e).__name__}: {str(e)[:160]}): left out")
    return times


def _reference(x: torch.Tensor, fw, bias: torch.Tensor | None) -> torch.Tensor:
    from bf.runtime.fused_layout import unpack_words

    w = (unpack_words(fw.words, fw.code_bits) - fw.half).to(x.dtype) * fw.scale.to(x.dtype)[:, None]  # [out, K]
    if x.dim() != 4:
        return F.linear(x, w, bias)
    kh, kw = fw.kernel
    w = w.view(fw.out_channels, kh, kw, fw.in_channels).permute(0, 3, 1, 2)
    y = F.conv2d(x, w, bias, fw.stride, fw.padding)
    return y.contiguous(memory_format=torch.channels_last)


@lowbit_fused_layer.register_fake
def _(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, layer: int) -> torch.Tensor:
    fw, _ = _LAYERS[layer]
    if x.dim() != 4:
        return x.new_empty((*x.shape[:-1], fw.out_channels))
    (kh, kw), s, p = fw.kernel, fw.stride, fw.padding
    b, _, h, w = x.shape
    oh, ow = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    return x.new_empty((b, fw.out_channels, oh, ow)).contiguous(memory_format=torch.channels_last)


class FusedLowBitLayer(nn.Module):
    """A Conv2d or Linear that runs the fused kernel on its codes; the FP16 weight never exists. The codes and
    scales are plain attributes on the device they were made on: ``.to()`` does not move them, and they are not
    in the state dict (the .bfq holds them)."""

    def __init__(self, module: nn.Conv2d | nn.Linear, fw, cfg):
        super().__init__()
        # plain attributes, not buffers: moving the model to float16 must not round the float32 scales
        self.words, self.scale = fw.words, fw.scale
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach(), requires_grad=False)
        self.layer = _layer_id(fw, cfg)  # its geometry and tile: _LAYERS[self.layer]
        self.conv = isinstance(module, nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:  # the kernel reads NHWC: the compiler then writes the input so in the kernel that makes it
            return torch.ops.bf.lowbit_fused_layer(x.contiguous(memory_format=torch.channels_last), self.words, self.scale, self.bias,
                                                   self.layer)  # fmt: skip
        # a linear layer's rows, whatever its input's rank (the op takes a 4-D input for a convolution's)
        y = torch.ops.bf.lowbit_fused_layer(x.reshape(-1, x.shape[-1]), self.words, self.scale, self.bias, self.layer)
        return y.view(*x.shape[:-1], y.shape[-1])


def _layer_inputs(owner: nn.Module, names: list[str], run_once: Callable[[], object]) -> dict[str, torch.Size]:
    """The input shape each named layer sees in one forward (a layer that runs twice: its first)."""
    shapes: dict[str, torch.Size] = {}
    hooks = []
    for name in names:

        def record(module, args, name=name):
            shapes.setdefault(name, args[0].shape)

        hooks.append(owner.get_submodule(name).register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            run_once()
    finally:
        for h in hooks:
            h.remove()
    return shapes


def choose_fused(owner: nn.Module, packed: dict, run_once: Callable[[], object], decoder, against: str = "stream",
                 margin: float = 1.0, log: Callable[[str], None] = lambda msg: None) -> dict[str, tuple]:  # fmt: skip
    """The layers of ``owner`` (name -> PackedWeight in ``packed``, on the GPU) that the fused kernel runs faster than
    the alternative, at the input shape each sees in ``run_once()`` (one forward, at the shape the step will run):
    name -> (FusedWeight, TileConfig). ``against``: "stream" (a step that decodes in its stream, grouped: see
    bf.runtime.compiled_weights), cuDNN / cuBLAS on the decoded weight plus the weight's share of a batched decode
    (its FP16 bytes at the rate ``decode_ms_per_byte`` measures once); "decode", decoding the one weight and running
    cuDNN / cuBLAS on it (each layer's decode a launch of its own: a step whose decodes are not batched), or "fp16",
    cuDNN / cuBLAS alone on the decoded weight (a step whose decode is hidden ahead). ``margin``: the fused kernel is
    taken where it runs within ``margin`` times the alternative's time (above 1: a layer whose decode, hidden ahead,
    still costs the step its share of the GPU's memory bandwidth; ``math.inf``: every layer a tile of the kernels
    runs, the alternative not timed). Layers of one class (shapes, stride, padding, width) are timed once, each way as
    a CUDA graph of back-to-back calls, so with the layer's codes and weight warm in L2."""
    if against not in AGAINST:
        raise BfError(f"fused layers: against={against!r}: must be one of {', '.join(repr(a) for a in AGAINST)}")
    if not margin > 0:
        raise BfError(f"fused layers: margin={margin}: must be a positive factor (1: only where the fused kernel is faster)")
    from bf.runtime.lowbit_gemm import TileConfig, tile_times
    from bf.runtime.streamed_weights import fusable_layer, fused_codes
    from bf.runtime.torch_graph import graph_time_ms

    candidates = [name for name, pw in packed.items() if fusable_layer(owner.get_submodule(name), pw)]
    shapes = _layer_inputs(owner, candidates, run_once)
    configs = [TileConfig(**c) for c in CANDIDATES]
    chosen: dict[str, tuple] = {}
    verdicts: dict[tuple, TileConfig | None] = {}
    every = margin == math.inf  # every layer a tile runs: the alternative's time cannot change the verdict
    per_byte_ms = math.nan
    if against == "stream" and not every:
        per_byte_ms = decode_ms_per_byte([packed[n] for n in candidates if n in shapes], decoder)
        log(f"fused layers: a batched decode writes {1e-6 / per_byte_ms:.0f} GB/s of FP16 weights (one weight's share of "
            "the step's decode)")  # fmt: skip
    for name in candidates:
        if name not in shapes:
            continue  # not run by the forward: left to the decode
        module, pw = owner.get_submodule(name), packed[name]
        conv = isinstance(module, nn.Conv2d)
        key = (tuple(shapes[name]), tuple(pw.spec.shape), pw.spec.grid.levels, module.stride if conv else 1, module.padding if conv else 0)
        fw = None
        if key not in verdicts:
            fw = fused_codes(module, pw, decoder)
            shape = shapes[name] if conv else (math.prod(shapes[name][:-1]), shapes[name][-1])  # as FusedLowBitLayer runs it
            x = torch.randn(shape, device=pw.codes.device, dtype=torch.float16)
            x = x.contiguous(memory_format=torch.channels_last) if conv else x
            bias = None if module.bias is None else module.bias.detach().to(torch.float16)
            buf = torch.empty(pw.numel, device=pw.codes.device, dtype=torch.float16)
            weight = pw.decode(decoder, buf)

            def decoded(x=x, pw=pw, buf=buf, weight=weight, bias=bias, module=module, conv=conv):
                w = pw.decode(decoder, buf) if against == "decode" else weight
                if conv:  # without its bias, as the compiled step runs it: inductor adds a convolution's bias in its
                    # next kernel (with a bias, cuDNN took SD-v1.5's 1x1 convolutions at 16x16 and 32x32 9-15 us, without 5-10)
                    return F.conv2d(x, w, None, module.stride, module.padding, module.dilation, module.groups)
                return F.linear(x, w, bias)

            other_ms = math.nan if every else graph_time_ms(decoded)
            op_ms, decode_ms = other_ms, 2 * pw.numel * per_byte_ms  # (decode_ms: "stream" alone)
            other_ms += decode_ms if against == "stream" else 0.0
            times = tile_times(x, fw, configs, bias) | _wgmma_times(x, fw, bias, log)
            best = min(times, key=times.get) if times else None
            best_ms = times[best] if times else math.inf
            verdicts[key] = best if (every and times) or best_ms < margin * other_ms else None
            geometry = f", stride {module.stride[0]}" if conv else ""
            label = {"stream": "op + its decode in the step", "decode": "decode + op", "fp16": "op"}[against]
            if every:
                other = f"{label} not timed"
            elif against == "stream":
                other = f"op {op_ms * 1e3:.1f} us + its decode in the step {decode_ms * 1e3:.1f} us"
            else:
                other = f"{label} {other_ms * 1e3:.1f} us"
            log(f"fused layers: {tuple(shapes[name])} x {tuple(pw.spec.shape)}{geometry} ({pw.spec.grid.levels} levels): "
                f"{other}, fused "
                f"{best_ms * 1e3:.1f} us ({best.name if best else 'no tile ran'}): {'fused' if verdicts[key] else 'decoded'}")  # fmt: skip
        if verdicts[key] is not None:
            fw = fw if fw is not None else fused_codes(module, pw, decoder)
            chosen[name] = (fw, verdicts[key])
    return chosen


def decode_ms_per_byte(weights: list, decoder, budget: int = 128 * 2**20, most: int = 8) -> float:
    """Milliseconds a batched decode (bf.runtime.compiled_weights' group launches) takes per FP16 byte it writes: the
    slope between decoding the first of up to ``most`` distinct weights alone and all of them in one launch, so
    without the launch's fixed cost, each weight's codes read once as in the step. The weights: the largest of
    ``weights`` (PackedWeight) of their most common packing (one launch per packing) that fit in ``budget`` bytes of
    FP16 together; where fewer than two fit, one weight decoded twice."""
    from collections import Counter

    from bf.runtime.torch_graph import graph_time_ms

    if not weights:
        return math.nan
    grid = Counter(w.spec.grid for w in weights).most_common(1)[0][0]  # (its bits and kind: the packing)
    picked, total = [], 0
    for w in sorted((w for w in weights if w.spec.grid == grid), key=lambda w: -w.numel):
        if len(picked) < most and total + 2 * w.numel <= budget:
            picked.append(w)
            total += 2 * w.numel
    if len(picked) < 2:
        one = picked[0] if picked else min(weights, key=lambda w: w.numel)
        picked = [one, one]
    batch = [(w.codes, w.scale, w.spec) for w in picked]
    outs = [torch.empty(w.spec.shape, device=w.codes.device, dtype=torch.float16) for w in picked]
    alone = graph_time_ms(lambda: decoder.decode_cuda_batch(batch[:1], outs[:1]))
    together = graph_time_ms(lambda: decoder.decode_cuda_batch(batch, outs))
    rest = 2 * sum(w.numel for w in picked[1:])
    slope = (together - alone) / rest
    return slope if slope > 0 else together / (rest + 2 * picked[0].numel)  # (timing noise: the launch's average)


def install_fused(owner: nn.Module, chosen: dict[str, tuple]) -> int:
    """Replace each layer named in ``chosen`` (``choose_fused``'s answer) by a FusedLowBitLayer; returns how many.
    Install them before bf.runtime.compiled_weights.compile_weights groups the rest (which must not name them)."""
    from bf.module_paths import parent_and_attribute

    for name, (fw, cfg) in chosen.items():
        try:
            module = owner.get_submodule(name)
        except AttributeError:
            raise BfError(f"fused layers: the model has no layer {name!r}") from None
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise BfError(f"fused layers: {name} is a {type(module).__name__}, not a Conv2d or Linear")
        parent, child = parent_and_attribute(owner, name)
        setattr(parent, child, FusedLowBitLayer(module, fw, cfg))
    return len(chosen)


def fused_bytes(owner: nn.Module) -> int:
    """Resident bytes of the fused layers' codes and scales."""
    return sum(m.words.nbytes + m.scale.nbytes for m in owner.modules() if isinstance(m, FusedLowBitLayer))
