"""The PyTorch backend (GPU): the model the directory was exported from, run by PyTorch, its
quantized weights decoded on the GPU by plugins_trt's kernels (bf.decode_kernels) from the
.bfq's packed codes. For benchmarking and checking where TensorRT is not installed; unlike
the ort and trt backends it needs torch and diffusers (pip install 'bf[train]').

Weights, three ways:
  streamed  only the packed codes stay on the GPU; each layer's weight is decoded just before
            it runs into a small ring of reused buffers, overlapped with compute (the default
            for quantized models: about 1/8 of the FP16 weight memory)
  decoded   every weight decoded once at load into FP16 (FP16 memory, FP16 speed)
  fp        the unquantized base model in FP16: the baseline bf bench compares against
Streamed layers may instead run a fused kernel that reads the codes in its matrix-product tiles
(``fused``, bf.runtime.lowbit_gemm, needs Triton): "auto" lets each layer's first call time
both and keep the faster, "on" fuses every layer the kernel can run, "off" (the default: on
SD-v1.5's streamed ring the kernel wins too few layers to pay, see BENCHMARKS.md) decodes all. The UNet step is replayed from a CUDA graph
(``cuda_graph``) and runs channels-last (``channels_last``) unless told otherwise.
``keep_decoded_bytes`` keeps that many bytes of the largest weights decoded (memory for speed; a compiled step
with fused layers keeps the others' smallest decode kernels whole instead, see below).

``compile``: the step is compiled by ``torch.compile`` (inductor fuses the elementwise work around the
convolutions and matrix products) and then replayed from a CUDA graph. Streamed weights are then
decoded inside the compiled step by custom ops (bf.runtime.compiled_weights), one launch per UNet
block, instead of the ring: in the step's stream, just before each block (the default: on SD-v1.5 it
is 0.15-0.22 ms slower than decoding ahead, at the lowest peak memory), or ahead, on a side stream, into
``ahead_slots`` persistent slots while the blocks before compute, the step's graph captured above the
decode stream's priority; decoded and fp weights are compiled as they are. With ``fused`` ("auto" or
"on"; in the step's stream only), the first step, before it compiles, times the fused kernels (on Hopper
also the TMA one, bf.runtime.compiled_fused) on each class of layer at the step's input shape against
cuDNN / cuBLAS on the decoded weight plus the weight's share of the step's batched decode, and the layers they
run faster ("auto") or can run at all ("on") read their codes in the compiled step instead of being decoded;
later input shapes keep that choice. ``keep_decoded_bytes`` then keeps decoded whole decode kernels of the
other layers (a group's layers of one packing), the smallest first, then the smallest single layers in what is
left: a decode kernel costs the step a few microseconds besides its bytes
(bf.runtime.compiled_weights.fewest_launches_within). On SD-v1.5 at 512x512 on an H200: 23 of 258 layers
fused, the step 1.069x the fastest FP16's with 120 MB of the smallest other layers kept (at most 0.28x its
memory; the choice took 97 s with Triton's cache empty, each tile compiling, and raises the first step's peak
by what its timings hold); keeping whole kernels instead, the step's decode alone takes 0.88x the time at 150
and 200 MB (0.88x and 0.87x; the step itself not yet timed with it: BENCHMARKS.md).
The first step of each input shape compiles (about a minute for SD-v1.5; inductor's cache under
``$BF_CACHE/torchinductor``, or ``$TORCHINDUCTOR_CACHE_DIR``, makes later processes faster).

``TorchBackend`` runs an exported directory; its UNet is a ``TorchUNet``, which can also be
built from a diffusers UNet and quantized weights held in memory (as benchmarks/sd15_unet_step.py
does with random ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from pathlib import Path

import numpy as np

from bf.errors import BfError
from bf.runtime.exported import ExportedModel

WEIGHT_MODES = ("streamed", "decoded", "fp")
FUSED_MODES = ("auto", "on", "off")


def _fused_mode(fused: str | None, channels_last: bool, dtype: str) -> str:
    """What ``fused`` (None: off) means on this machine and model."""
    if fused not in (None, *FUSED_MODES):
        raise BfError(f"fused={fused!r}: must be one of {', '.join(FUSED_MODES)}")
    reason = None
    if not channels_last or dtype != "float16":
        reason = "runs float16, channels-last models only"
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            reason = "needs Triton (pip install triton; it comes with PyTorch's CUDA builds)"
    if reason and fused == "on":
        raise BfError(f"the fused low-bit kernel {reason}")
    return "off" if reason or fused is None else fused


VAE_TILE_PX = 512  # low memory: the VAE decodes tiles of this many pixels (diffusers' enable_tiling, its seams blended)


class TorchUNet:
    """The torch backend's UNet: a diffusers UNet2DConditionModel on the GPU whose time embedding is
    a table over the scheduler's timesteps (bf.models.time_cache), with its quantized weights
    ``streamed``, ``decoded`` once or left ``fp`` (see above), channels-last and its step replayed
    from a CUDA graph unless told otherwise.

    ``unet`` is changed in place (pass a copy to keep it) and moved to ``device`` as ``dtype``;
    ``timesteps`` are the scheduler's, and a step is called with its index among them.
    ``layers``: the quantized weights by layer name, as a .bfq holds them (QuantizedLayer) or
    already packed on the GPU (bf.runtime.streamed_weights.PackedWeight); ``fp`` needs none.
    ``fused``, ``slots`` and ``keep_decoded_bytes`` apply to streamed weights, as do ``ahead_slots`` (compiled), ``group``,
    ``priority`` and ``decode_blocks`` (how the ring decodes: see
    bf.runtime.streamed_weights.stream_weights). ``decoder``: the decode library
    (bf.decode_kernels.load() when None).

    ``loras``: (file, scale) pairs of LoRA adapters (bf.lora_adapters): added to the low-bit weights where the step
    decodes them (compiled or streamed), a low-rank branch hooked beside every other layer (``lora_files``: the
    files already read, by path).

    ``step(sample, step_index, context)`` runs one step (its output may be reused by the next
    call; ``eager_step`` is the same without the CUDA graph); ``module`` is the model it runs and
    ``ring`` the streamed weights' decode ring (None unless streamed).
    """

    def __init__(self, unet, timesteps, layers: dict | None = None, *, weights: str = "streamed", device: str = "cuda",
                 dtype: str = "float16", channels_last: bool = True, cuda_graph: bool = True, slots: int = 2, fused: str | None = None,
                 keep_decoded_bytes: int = 0, decoder=None, group: bool = True, priority: int = 0, decode_blocks: int = 0,
                 compile: bool = False, ahead_slots: int = 0, loras=(), lora_files: dict | None = None,
                 log=lambda msg: None):  # fmt: skip
        import torch

        from bf.models.time_cache import cache_time_features
        from bf.runtime.torch_graph import GraphedCall, unet_step

        if weights not in WEIGHT_MODES:
            raise BfError(f"weights={weights!r}: must be one of {', '.join(WEIGHT_MODES)}")
        if weights != "fp" and not layers:
            raise BfError(f"weights={weights!r} needs the quantized layers")
        torch_dtype = getattr(torch, dtype)
        self.lora = None
        if loras:  # checked against the layers before any is swapped; hooked on where the weights end up
            from bf.lora_adapters import LoRAHooks

            self.lora = LoRAHooks(unet, list(loras), lora_files).to(device, torch_dtype)
            if channels_last:
                self.lora.to(memory_format=torch.channels_last)
            if weights != "streamed":  # the ring replaces the layers, and a compiled step builds the weights: below
                self.lora.register(unet)
        module = cache_time_features(unet, torch.as_tensor(timesteps))
        self.unet = unet  # the diffusers UNet inside ``module``: its layers by their state-dict names
        self.ring = None
        self.decoded_layers = 0
        self.fused = "off"
        self.compiled = compile
        self.compiled_bytes = 0  # codes and scales the compiled step decodes
        self.compiled_kept_bytes = 0  # weights a compiled step keeps decoded instead
        self.slot_bytes = 0  # the slots a compiled step decodes ahead into
        self._fuse_first = None  # compiled with fused layers: what the first step chooses among (see _choose_fused)
        if compile and weights == "streamed":
            self.fused = _fused_mode(fused, channels_last, dtype)
            fusing = self.fused != "off"  # then the weights kept decoded are chosen with the fused layers, at the first step
            if fusing and ahead_slots:
                raise BfError(f"fused={fused!r} with a compiled step decoding ahead: fused layers run in a step that decodes in "
                              "its stream (ahead_slots=0), which measured as fast at less memory")  # fmt: skip
            if fused not in (None, "off") and not fusing:
                log(f"fused layers: off (fused={fused!r}: the fused kernels need Triton and a float16, channels-last model); "
                    "weights kept decoded are the largest")  # fmt: skip
            keep_now = 0 if fusing else keep_decoded_bytes
            module, self.decoded_layers, self.compiled_bytes, self.compiled_kept_bytes, packed, deltas = _compiled_lowbit(
                module, unet, layers, device, torch_dtype, channels_last, keep_now, decoder, self.lora)  # fmt: skip
            if fusing:
                self._fuse_first = (packed, deltas, keep_decoded_bytes, torch_dtype, decoder, log)
        elif weights == "streamed":
            from bf.runtime.streamed_weights import stream_weights

            self.fused = _fused_mode(fused, channels_last, dtype)
            module = stream_weights(module, unet, layers, device=device, dtype=torch_dtype, channels_last=channels_last, slots=slots,
                                    decoder=decoder, group=group, fused=self.fused, keep_decoded_bytes=keep_decoded_bytes,
                                    priority=priority, decode_blocks=decode_blocks, lora=self.lora)  # fmt: skip
            module = module.to(device, torch_dtype)
            if self.lora is not None:
                self.lora.register(unet)
            self.ring = module.ring
            self.decoded_layers = len(self.ring.weights)
        else:
            module = module.to(device, torch_dtype)
            if weights == "decoded":
                self.decoded_layers = _decode_quantized_weights(unet, layers, device, decoder)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.eager_step = unet_step(module, channels_last, device)
        if compile and weights == "streamed" and ahead_slots:
            from bf.runtime.compiled_weights import decode_ahead

            try:  # the order of the blocks, from one forward of the smallest input the UNet takes
                self.slot_bytes = decode_ahead(unet, lambda: self.eager_step(*_smallest_inputs(unet, device, torch_dtype)), ahead_slots,
                                               log=log)  # fmt: skip
            except Exception as e:  # a model whose blocks cannot be scheduled runs as well decoding in the step's stream
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log(f"the compiled step decodes each block's weights just before it (decoding ahead: {first})")
        step, priority = self.eager_step, 0
        if compile:
            import os

            from bf.cache import cache_root

            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "torchinductor"))
            from bf.runtime.compiled_weights import AHEAD_COMPILE_OPTIONS, STEP_PRIORITY

            options, priority = (AHEAD_COMPILE_OPTIONS, STEP_PRIORITY) if self.slot_bytes else (None, 0)
            step = _logged_first_calls(torch.compile(step, fullgraph=True, options=options), log, os.environ["TORCHINDUCTOR_CACHE_DIR"])
            if self._fuse_first is not None:
                step = self._choosing_fused_first(step)
        self.step = GraphedCall(step, priority=priority) if cuda_graph else step

    def _choosing_fused_first(self, step):
        """``step`` whose first call first chooses the fused layers at its inputs' shape (before it compiles)."""

        def call(*inputs):
            if self._fuse_first is not None:
                self._choose_fused(inputs)
            return step(*inputs)

        return call

    def _choose_fused(self, inputs: tuple) -> None:
        """Time the fused kernels on every class of compiled layer at ``inputs``' shapes (one eager forward finds each
        layer's input) and regroup the step: the layers they run faster ("auto"), or every one they run ("on"), read
        their codes; of the others, whole decode kernels within ``keep_decoded_bytes``, the smallest first, are decoded
        once (their decodes in the step are mostly launches), and the rest are decoded in the step as before."""
        import time

        import torch
        from torch import nn

        from bf.runtime.compiled_fused import choose_fused, fused_bytes, install_fused
        from bf.runtime.compiled_weights import compile_weights, fewest_launches_within, grouped_paths, packed_bytes, ungroup

        packed, deltas, keep_bytes, dtype, decoder, log = self._fuse_first
        with_lora = {h.layer for h in self.lora.hooks} if self.lora is not None else set()  # a LoRA stays on its layer
        candidates = {n: w for n, w in packed.items() if n not in with_lora}
        if decoder is None:
            from bf.decode_kernels import load

            decoder = load()
        log(f"timing the fused low-bit kernels against cuDNN/cuBLAS plus the weight's decode on the UNet's layers at input "
            f"{list(inputs[0].shape)} (once, before the step compiles; later input shapes keep this choice)")  # fmt: skip
        t0 = time.perf_counter()
        margin = 1.0 if self.fused == "auto" else math.inf  # "on": every layer a tile of the kernels runs
        with torch.inference_mode(False):  # the fused layers' codes and the regrouped layers are the model's, not inference tensors
            paths = grouped_paths(self.unet)  # timed where the layers sit now, inside their groups (the forward needs them)
            named = {p: n for n, p in paths.items()}
            try:  # the model is not changed until the choice is made
                chosen = choose_fused(self.unet, {paths[n]: w for n, w in candidates.items()}, lambda: self.eager_step(*inputs),
                                      decoder, "stream", margin, log=log)  # fmt: skip
            except BfError:
                raise
            except Exception as e:  # Triton or the GPU: a problem of this machine's toolchain, not of the model
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise BfError(f"timing the fused low-bit kernels failed ({type(e).__name__}: {first}); run without --fused") from e
            self._fuse_first = None
            chosen = {named[p]: c for p, c in chosen.items()}
            itemsize = torch.tensor([], dtype=dtype).element_size()
            kept = fewest_launches_within({n: w for n, w in candidates.items() if n not in chosen}, keep_bytes // itemsize,
                                          fixed={n: w for n, w in packed.items() if n not in candidates})  # fmt: skip
            if chosen or kept:
                ungroup(self.unet)
                install_fused(self.unet, chosen)
                for name in kept:
                    self.unet.get_submodule(name).weight = nn.Parameter(_decoded_once(packed[name], decoder, dtype), requires_grad=False)
                rest = {n: p for n, p in packed.items() if n not in chosen and n not in kept}
                compile_weights(self.unet, rest, dtype, decoder=decoder, deltas={n: d for n, d in deltas.items() if n in rest})
                self.compiled_bytes = packed_bytes(self.unet) + fused_bytes(self.unet)
                self.compiled_kept_bytes = sum(packed[n].numel for n in kept) * itemsize
        kept_text = f", {len(kept)} of the others ({self.compiled_kept_bytes / 2**20:.1f} MB) decoded once" if kept else ""
        log(f"fused layers: {len(chosen)} of the {len(packed)} compiled layers read their codes in the fused kernel{kept_text}, the "
            f"rest are decoded in the step ({time.perf_counter() - t0:.1f} s)")  # fmt: skip

    def release_graphs(self) -> None:
        """Let go of the step's CUDA graphs and the memory pool their activations live in (the next step captures
        again; a compiled step keeps its compiled code)."""
        import gc

        import torch

        from bf.runtime.torch_graph import GraphedCall

        if isinstance(self.step, GraphedCall):
            self.step.release()
            gc.collect()
            torch.cuda.empty_cache()

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of the quantized weights held outside the module's parameters: the streamed layers' packed
        codes and scales, weights kept decoded and fused layers' words, or the compiled layers' codes and scales and
        fused layers' words (0 for decoded and fp weights: the module's parameters hold them)."""
        return self.module.weight_bytes if self.ring is not None else self.compiled_bytes

    @property
    def fused_layers(self) -> int:
        """Layers running the fused low-bit kernel (0 before the first step)."""
        if self.ring is not None:
            return self.module.fused_layers
        from bf.runtime.compiled_fused import FusedLowBitLayer

        return sum(isinstance(m, FusedLowBitLayer) for m in self.unet.modules()) if self.compiled else 0

    @property
    def kept_decoded_bytes(self) -> int:
        """Bytes of the quantized weights kept decoded (``keep_decoded_bytes``; 0 for decoded and fp weights, and for a
        compiled step with fused layers until its first call has chosen them)."""
        return self.module.kept_decoded_bytes if self.ring is not None else self.compiled_kept_bytes

    def streamed_layers(self) -> dict:
        """The streamed layers (bf.runtime.streamed_weights.StreamedLayer) by name; after the first step
        with ``fused="auto"``, each holds what it measured (``timings``) and chose (``config``)."""
        from bf.runtime.streamed_weights import StreamedLayer

        return {name: m for name, m in self.unet.named_modules() if isinstance(m, StreamedLayer)}


def _compiled_lowbit(module, unet, layers: dict, device: str, dtype, channels_last: bool, keep_decoded_bytes: int, decoder,
                     lora=None):  # fmt: skip
    """``module`` on the device with its quantized layers decoded in the step by the custom op, except the
    largest weights within ``keep_decoded_bytes``, decoded once. ``lora`` (bf.lora_adapters.LoRAHooks): the
    branches on the layers decoded in the step are added to their weights there; the others are hooked. Returns the
    module, the number of quantized layers, the resident bytes of the compiled layers' codes and scales, the bytes
    kept decoded, and the compiled layers' packed weights and LoRA changes by name (to group them again)."""
    import torch

    from bf.runtime.compiled_weights import compile_weights, packed_bytes
    from bf.runtime.streamed_weights import PackedWeight, largest_within, packed_weight, quantized_modules

    itemsize = torch.tensor([], dtype=dtype).element_size()
    modules = quantized_modules(unet, layers)
    sizes = {n: math.prod(layers[n].spec.shape if isinstance(layers[n], PackedWeight) else layers[n].shape) for n in modules}
    kept = {n: layers[n] for n in largest_within(sizes, keep_decoded_bytes // itemsize)}
    # only the layers the step decodes are packed for the GPU; the kept ones are decoded once, below
    packed = {
        n: w if isinstance(w := layers[n], PackedWeight) else packed_weight(w, device, channels_last) for n in modules if n not in kept
    }
    deltas = None
    if lora is not None:  # hooked by name before the groups take the blocks in: a hook stays on its layer inside them
        deltas = lora.take_weight_deltas({n: w.channels_last for n, w in packed.items()})
        lora.register(unet)
    compile_weights(unet, packed, dtype, decoder=decoder, deltas=deltas)  # before the move: no FP16 copy
    module = module.to(device, dtype)
    if kept:
        _decode_quantized_weights(unet, kept, device, decoder)
    return module, len(modules), packed_bytes(unet), sum(sizes[n] for n in kept) * itemsize, packed, deltas or {}


def _decoded_once(w, decoder, dtype):
    """A PackedWeight decoded into a weight of its own, module-shaped (a channels-last one in channels-last memory), on
    the device its codes are on (the CPU: the library's CPU decode, for tests)."""
    import torch

    flat = torch.empty(w.numel, dtype=dtype, device=w.codes.device)
    if flat.is_cuda:
        return w.decode(decoder, flat)
    flat.copy_(torch.from_numpy(decoder.decode_cpu(w.codes.numpy(), w.scale.numpy(), w.spec)).reshape(-1))
    return w.view(flat)


def _smallest_inputs(unet, device: str, dtype):
    """A step's inputs at the smallest latent the UNet's resamplers take, one token of context (SDXL: and its added
    conditioning, packed after it)."""
    import torch

    from bf.models.added_condition import extra_rows, has_added_embedding, pooled_dim

    side = 2 ** (len(unet.config.block_out_channels) - 1)
    width = unet.config.cross_attention_dim
    width = width[0] if isinstance(width, (list, tuple)) else width
    sample = torch.zeros(1, unet.config.in_channels, side, side, device=device, dtype=dtype)
    tokens = 1
    if has_added_embedding(unet):  # SDXL: the added conditioning's rows after the token (packed)
        tokens += extra_rows(width, pooled_dim(unet.config))
    return sample, torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, tokens, width, device=device, dtype=dtype)


def _logged_first_calls(step, log, cache_dir: str):
    """``step`` that says when its first call for an input shape compiles, and how long that took."""
    import time

    seen: set = set()

    def call(*args):
        key = tuple(tuple(a.shape) for a in args)
        if key in seen:
            return step(*args)
        seen.add(key)
        log(f"compiling the UNet step for input {list(key[0])} (once per shape; inductor's cache: {cache_dir})")
        t0 = time.perf_counter()
        try:
            out = step(*args)
        except Exception as e:  # dynamo or inductor: a toolchain problem of this machine, not of the model
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise BfError(f"torch.compile could not compile the UNet step ({type(e).__name__}: {first}); run without --compile") from e
        log(f"compiled in {time.perf_counter() - t0:.1f} s")
        return out

    return call


def _decode_quantized_weights(unet, layers: dict, device: str, decoder=None) -> int:
    """Every quantized weight of ``unet`` decoded from its packed codes by the CUDA kernels, in place: one
    batched launch for the weights stored in their module's layout, a launch and a copy each for those
    stored channels-last. Returns how many were decoded."""
    import torch

    from bf.decode_kernels import load
    from bf.runtime.streamed_weights import PackedWeight, packed_weight, quantized_modules

    decoder = decoder or load()
    modules = quantized_modules(unet, layers)
    packed = {n: w if isinstance(w := layers[n], PackedWeight) else packed_weight(w, device, channels_last=False) for n in modules}
    direct = [(w, modules[n].weight.data) for n, w in packed.items() if not w.channels_last]
    if direct:
        decoder.decode_cuda_batch([(w.codes, w.scale, w.spec) for w, _ in direct], [out for _, out in direct])
    for name, w in packed.items():
        if w.channels_last:
            weight = modules[name].weight.data
            weight.copy_(w.decode(decoder, torch.empty(w.numel, dtype=weight.dtype, device=weight.device)))
    torch.cuda.synchronize()
    return len(packed)


def vae_run_dtype(torch, dtype, upcast: bool, low_memory: bool, device: str):
    """The VAE's dtype. SDXL's VAE overflows in float16 (its config's force_upcast): it runs in float32, as diffusers
    runs it, except in low memory on a GPU with bfloat16, where it runs in bfloat16 (float32's range at half the bytes:
    a 1024x1024 decode's float32 activations and weights would take the generation's peak past the UNet's)."""
    if not upcast or dtype == torch.float32:
        return dtype
    if low_memory and device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


class TorchBackend:
    name = "torch"

    def __init__(self, model: ExportedModel, device: str = "cuda", dtype: str = "float16", weights: str | None = None,
                 cuda_graph: bool = True, channels_last: bool = True, slots: int = 2, fused: str | None = None,
                 keep_decoded_bytes: int = 0, compile: bool = False, loras=(), low_memory: bool = False,
                 vae_tile_px: int = VAE_TILE_PX, log=lambda msg: None):  # fmt: skip
        """``low_memory``: the text encoders and the VAE on the GPU only while they run, for a lower peak: the text
        encoders wait on the CPU and run on the GPU one at a time; the UNet is built at its first step (so in the
        first generation after the prompt is encoded; its packed weights then stay on the GPU), and its CUDA graph,
        with the activations it holds, is let go whenever the text encoders or the VAE visit; the VAE decodes one
        image at a time in tiles of ``vae_tile_px`` pixels (diffusers' slicing and tiling: blended seams, not
        bit-equal to one decode), and a VAE that overflows in float16 runs in bfloat16 (``vae_run_dtype``). Each step
        after a visit captures the UNet's graph again (not recompiled)."""
        try:
            import torch

            from bf.models.diffusers_pipeline import load_model
            from bf.models.graph_modules import VaeDecoderGraph, text_encoder_graphs
        except ImportError:
            raise BfError("the torch backend needs PyTorch and diffusers: pip install 'bf[train]'") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BfError("the torch backend runs on a CUDA GPU and none is visible; use --backend ort")
        quantized = model.manifest.model.quantized
        # the export's own LoRAs (traced into its graphs) first: this backend runs the source model, so it adds them, the
        # same files (by SHA-256) at the same scales
        recorded = model.manifest.raw.get("loras") or []
        exported = [(Path(r["file"]), float(r["scale"])) for r in recorded]
        for r in recorded:
            path = Path(r["file"])
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != r["sha256"]:
                why = "is gone" if not path.is_file() else "has changed since"
                raise BfError(f"{model.root} was exported with the LoRA {path}, which {why}; the torch backend runs the source "
                              "model and adds the LoRA itself: put the file back as it was, or use --backend ort or trt")  # fmt: skip
        self.loras = [*exported, *((Path(f), float(scale)) for f, scale in loras)]
        lora_files = {}
        if self.loras:  # every file read and checked before the model loads
            from bf.lora_adapters import read_lora

            lora_files = {path: read_lora(path) for path, _ in self.loras}
        weights = weights or ("streamed" if quantized else "fp")
        if weights not in WEIGHT_MODES:
            raise BfError(f"weights={weights!r}: must be one of {', '.join(WEIGHT_MODES)}")
        if fused not in (None, "off") and weights == "decoded":  # (the fp baseline has no codes: fused means nothing there)
            raise BfError(f"fused={fused!r} runs on streamed weights, not weights='decoded'")
        if weights != "fp" and not quantized:
            raise BfError(f"{model.root} holds an FP model; weights={weights!r} needs a quantized export")
        source = Path(model.manifest.model.source)
        if not source.exists():
            raise BfError(f"the torch backend runs the model {model.root} was exported from, and {source} is gone")
        if weights == "fp" and quantized:
            from bf.models.base_model import quantized_from

            source = quantized_from(source).root
        self.torch, self.dtype, self.device, self.weights = torch, getattr(torch, dtype), device, weights
        ckpt = None
        if weights != "fp":
            from bf.format import Checkpoint

            ckpt = Checkpoint.load(source)  # once: the pipeline and the packed layers both come from it
        if vae_tile_px < 64 or vae_tile_px % 64:
            raise BfError(f"vae_tile_px={vae_tile_px}: must be a multiple of 64")
        pipe = load_model(source, scheduler=model.manifest.scheduler.name, checkpoint=ckpt).pipe
        unet_args = (pipe.unet.float().eval(), model.manifest.scheduler.timesteps, ckpt.layers if ckpt else None)
        unet_kwargs = dict(weights=weights, device=device, dtype=dtype, channels_last=channels_last, cuda_graph=cuda_graph, slots=slots,
                           fused=fused, keep_decoded_bytes=keep_decoded_bytes, compile=compile, loras=self.loras,
                           lora_files=lora_files, log=log)  # fmt: skip
        self._torch_unet = None
        self._build_unet = lambda: TorchUNet(*unet_args, **unet_kwargs)
        self.low_memory, self.log = low_memory, log
        if not low_memory:
            self.torch_unet  # noqa: B018 (built now)
        else:  # what building it later would refuse, refused now, before any stage runs
            if self.loras:
                from bf.lora_adapters import LoRAHooks

                LoRAHooks(unet_args[0], list(self.loras), lora_files)
            if weights == "streamed":
                _fused_mode(fused, channels_last, dtype)
        self.compiled, self.channels_last, self.cuda_graph = compile, channels_last, cuda_graph
        # low memory: the text encoders and the VAE wait on the CPU (in the dtype they run in) and visit the GPU
        home = "cpu" if low_memory else device
        texts = text_encoder_graphs(pipe)
        self.text = texts["text_encoder"].eval().to(home, self.dtype)
        self.text_2 = texts["text_encoder_2"].eval().to(home, self.dtype) if "text_encoder_2" in texts else None
        self.vae_dtype = vae_run_dtype(torch, self.dtype, model.manifest.vae_upcast, low_memory, device)
        if low_memory:
            pipe.vae.enable_slicing()  # one image at a time, each in tiles
            pipe.vae.enable_tiling()
            pipe.vae.tile_sample_min_size = vae_tile_px
            pipe.vae.tile_latent_min_size = vae_tile_px // model.manifest.image.latent_scale
        self.vae = VaeDecoderGraph(pipe.vae).eval().to(home, self.vae_dtype)

    @property
    def torch_unet(self) -> TorchUNet:
        """The UNet (low memory: built here at its first use, after the prompt is encoded)."""
        if self._torch_unet is None:
            if self.low_memory:
                self.log("building the UNet on the GPU (low memory: after the text encoders have left it)")
            with self.torch.inference_mode(False):  # its weights and buffers are not inference tensors, wherever it is built
                self._torch_unet = self._build_unet()
            self._build_unet = None  # the .bfq's layers and LoRA files it held: not kept for the backend's life
        return self._torch_unet

    @property
    def lora_applied(self) -> list:
        return self.torch_unet.lora.applied if self.torch_unet.lora is not None else []

    @property
    def ring(self):
        return self.torch_unet.ring

    @property
    def decoded_layers(self) -> int:
        return self.torch_unet.decoded_layers

    @property
    def fused(self) -> str:
        return self.torch_unet.fused

    @property
    def unet_module(self):
        return self.torch_unet.module

    @contextlib.contextmanager
    def _visiting(self, module):
        """``module`` on the GPU for one call (low memory), else as it is. Low memory: the UNet's CUDA graph and its
        activations are let go before any visitor comes (the text encoders of a later generation, the VAE)."""
        if not self.low_memory or self.device == "cpu":
            yield module
            return
        if self._torch_unet is not None:
            self._torch_unet.release_graphs()
        try:
            yield module.to(self.device)
        finally:
            module.to("cpu")
            self.torch.cuda.empty_cache()

    @property
    def device_name(self) -> str:
        return self.torch.cuda.get_device_name() if self.device == "cuda" else self.device

    def unet_device(self, sample, step, context):
        """One UNet step on device tensors (step: a (1,) long tensor); the output may be reused by the next call."""
        with self.torch.inference_mode():
            return self.torch_unet.step(sample, step, context)

    def _run(self, fn, *arrays: np.ndarray, dtype=None):
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(self.device, (a.dtype == np.int64 and torch.long) or dtype or self.dtype) for a in arrays]
            out = fn(*args)
            return tuple(o.float().cpu().numpy() for o in out) if isinstance(out, tuple) else out.float().cpu().numpy()

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        with self._visiting(self.text) as text:
            return self._run(text, input_ids.astype(np.int64))

    def text_encoder_2(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._visiting(self.text_2) as text_2:
            return self._run(text_2, input_ids.astype(np.int64))

    def unet(self, sample: np.ndarray, step: int, encoder_hidden_states: np.ndarray, added: dict | None = None) -> np.ndarray:
        """``added``: SDXL's text_embeds and time_ids, packed after the hidden states (the one context tensor the
        captured and compiled steps take; the UNet unpacks it)."""
        if added is not None:
            from bf.models.added_condition import pack

            torch = self.torch
            encoder_hidden_states = pack(*(torch.from_numpy(a) for a in (encoder_hidden_states, added["text_embeds"], added["time_ids"])))
            encoder_hidden_states = encoder_hidden_states.numpy()
        return self._run(self.unet_device, sample, np.array([step], dtype=np.int64), encoder_hidden_states)

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        with self._visiting(self.vae) as vae:
            return self._run(vae, latent, dtype=self.vae_dtype)

    # bf bench: the stages on device tensors, timed with CUDA events.
    def device_calls(self, inputs: dict[str, np.ndarray]) -> dict:
        """The bench stages over ``inputs`` (bf.runtime.bench.stage_inputs) copied to the GPU once; the UNet is built
        here (low memory builds it at its first use), so that no stage's timing or peak counts building it."""
        torch = self.torch
        self.torch_unet  # noqa: B018 (built now)
        t = {k: torch.from_numpy(a).to(self.device, torch.long if a.dtype == np.int64 else self.dtype) for k, a in inputs.items()}
        step = torch.zeros((1,), dtype=torch.long, device=self.device)
        if "text_embeds" in t:  # SDXL: the added conditioning packed after the hidden states, as ``unet`` feeds it
            from bf.models.added_condition import pack

            t["context"] = pack(t["context"], t["text_embeds"], t["time_ids"])

        def timed(fn):
            def call():
                with torch.inference_mode():
                    fn()

            return call

        return {
            "text_encoder": timed(lambda: self._text_on_device(t["input_ids"])),
            "unet_step": timed(lambda: self.unet_device(t["sample"], step, t["context"])),
            "vae_decoder": timed(lambda: self._vae_on_device(t["latent"].to(self.vae_dtype))),
        }

    def _text_on_device(self, input_ids):
        """Both text encoders on device tensors (low memory: each visiting the GPU, as a generation runs them)."""
        with self._visiting(self.text) as text:
            text(input_ids)
        if self.text_2 is not None:
            with self._visiting(self.text_2) as text_2:
                text_2(input_ids)

    def _vae_on_device(self, latent):
        with self._visiting(self.vae) as vae:
            return vae(latent)

    def time_ms(self, call, runs: int, warmup: int) -> list[float]:
        from bf.runtime.torch_graph import cuda_time_ms

        return cuda_time_ms(call, runs, warmup)

    def memory(self) -> dict:
        """Resident bytes: UNet weights (codes and scales when streamed), decode ring, the rest of the model."""
        torch = self.torch

        def nbytes(module) -> int:
            return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

        unet = nbytes(self.unet_module) + self.torch_unet.weight_bytes
        text_vae = nbytes(self.text) + (nbytes(self.text_2) if self.text_2 is not None else 0) + nbytes(self.vae)
        return {
            "unet_weight_bytes": unet,
            "decode_ring_bytes": self.ring.buffer_bytes if self.ring is not None else self.torch_unet.slot_bytes,
            "text_vae_bytes": 0 if self.low_memory else text_vae,  # resident on the GPU
            **({"text_vae_visiting_bytes": text_vae} if self.low_memory else {}),  # on the GPU only while they run
            "allocated_bytes": torch.cuda.memory_allocated(),
        }

    @property
    def fused_layers(self) -> int:
        """UNet layers running the fused low-bit kernel (0 before the first step)."""
        return self.torch_unet.fused_layers

    def reset_peak_memory(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int:
        return self.torch.cuda.max_memory_allocated()
