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
SD-v1.5 the kernel wins too few layers to pay, see BENCHMARKS.md) decodes all. The UNet step is replayed from a CUDA graph
(``cuda_graph``) and runs channels-last (``channels_last``) unless told otherwise.
``keep_decoded_bytes`` keeps that many bytes of the largest weights decoded (memory for speed).
"""

from __future__ import annotations

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


class TorchBackend:
    name = "torch"

    def __init__(self, model: ExportedModel, device: str = "cuda", dtype: str = "float16", weights: str | None = None,
                 cuda_graph: bool = True, channels_last: bool = True, slots: int = 2, fused: str | None = None,
                 keep_decoded_bytes: int = 0):  # fmt: skip
        try:
            import torch

            from bf.models.diffusers_pipeline import load_model
            from bf.models.graph_modules import TextEncoderGraph, VaeDecoderGraph
            from bf.models.time_cache import cache_time_features
            from bf.runtime.torch_graph import GraphedCall, unet_step
        except ImportError:
            raise BfError("the torch backend needs PyTorch and diffusers: pip install 'bf[train]'") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BfError("the torch backend runs on a CUDA GPU and none is visible; use --backend ort")
        quantized = model.manifest.model.quantized
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
        pipe = load_model(source, scheduler=model.manifest.scheduler.name, checkpoint=ckpt).pipe
        timesteps = torch.as_tensor(model.manifest.scheduler.timesteps)
        unet = cache_time_features(pipe.unet.float().eval(), timesteps)
        self.ring = None
        self.decoded_layers = 0
        self.fused = "off"
        if weights == "streamed":
            from bf.runtime.streamed_weights import stream_weights

            self.fused = _fused_mode(fused, channels_last, dtype)
            unet = stream_weights(unet, unet.unet, ckpt.layers, device=device, dtype=self.dtype, channels_last=channels_last, slots=slots,
                                  fused=self.fused, keep_decoded_bytes=keep_decoded_bytes)  # fmt: skip
            unet = unet.to(device, self.dtype)
            self.ring = unet.ring
            self.decoded_layers = len(self.ring.weights)
        else:
            unet = unet.to(device, self.dtype)
            if weights == "decoded":
                self.decoded_layers = self._decode_quantized_weights(unet, ckpt.layers)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        self.unet_module = unet
        self._step_fn = unet_step(unet, channels_last, device)
        if cuda_graph:
            self._step_fn = GraphedCall(self._step_fn)
        self.text = TextEncoderGraph(pipe.text_encoder).eval().to(device, self.dtype)
        self.vae = VaeDecoderGraph(pipe.vae).eval().to(device, self.dtype)

    @property
    def device_name(self) -> str:
        return self.torch.cuda.get_device_name() if self.device == "cuda" else self.device

    def _decode_quantized_weights(self, unet, layers: dict) -> int:
        """Every quantized weight, decoded from its packed codes by the CUDA kernels, in place (one batched launch)."""
        from bf.decode_kernels import load
        from bf.runtime.streamed_weights import packed_weight, quantized_modules

        modules = quantized_modules(unet.unet, layers)
        packed = [packed_weight(layers[name], self.device, channels_last=False) for name in modules]
        load().decode_cuda_batch([(w.codes, w.scale, w.spec) for w in packed], [m.weight.data for m in modules.values()])
        self.torch.cuda.synchronize()
        return len(packed)

    def unet_device(self, sample, step, context):
        """One UNet step on device tensors (step: a (1,) long tensor); the output may be reused by the next call."""
        with self.torch.inference_mode():
            return self._step_fn(sample, step, context)

    def _run(self, fn, *arrays: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(self.device, (a.dtype == np.int64 and torch.long) or self.dtype) for a in arrays]
            return fn(*args).float().cpu().numpy()

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run(self.text, input_ids.astype(np.int64))

    def unet(self, sample: np.ndarray, step: int, encoder_hidden_states: np.ndarray) -> np.ndarray:
        return self._run(self.unet_device, sample, np.array([step], dtype=np.int64), encoder_hidden_states)

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self._run(self.vae, latent)

    # bf bench: the stages on device tensors, timed with CUDA events.
    def device_calls(self, inputs: dict[str, np.ndarray]) -> dict:
        """The bench stages over ``inputs`` (bf.runtime.bench.stage_inputs) copied to the GPU once."""
        torch = self.torch
        t = {k: torch.from_numpy(a).to(self.device, torch.long if a.dtype == np.int64 else self.dtype) for k, a in inputs.items()}
        step = torch.zeros((1,), dtype=torch.long, device=self.device)

        def timed(fn):
            def call():
                with torch.inference_mode():
                    fn()

            return call

        return {
            "text_encoder": timed(lambda: self.text(t["input_ids"])),
            "unet_step": timed(lambda: self.unet_device(t["sample"], step, t["context"])),
            "vae_decoder": timed(lambda: self.vae(t["latent"])),
        }

    def time_ms(self, call, runs: int, warmup: int) -> list[float]:
        from bf.runtime.torch_graph import cuda_time_ms

        return cuda_time_ms(call, runs, warmup)

    def memory(self) -> dict:
        """Resident bytes: UNet weights (codes and scales when streamed), decode ring, the rest of the model."""
        torch = self.torch

        def nbytes(module) -> int:
            return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

        unet = nbytes(self.unet_module)
        if self.ring is not None:
            unet += self.unet_module.weight_bytes
        return {
            "unet_weight_bytes": unet,
            "decode_ring_bytes": self.ring.buffer_bytes if self.ring is not None else 0,
            "text_vae_bytes": nbytes(self.text) + nbytes(self.vae),
            "allocated_bytes": torch.cuda.memory_allocated(),
        }

    @property
    def fused_layers(self) -> int:
        """UNet layers running the fused low-bit kernel (0 before the first step)."""
        return self.unet_module.fused_layers if self.ring is not None else 0

    def reset_peak_memory(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int:
        return self.torch.cuda.max_memory_allocated()
