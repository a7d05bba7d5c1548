"""The PyTorch backend (GPU): the model the directory was exported from, run by PyTorch, its
quantized weights decoded on the GPU by plugins_trt's kernels (bf.decode_kernels, batched) from
the .bfq's packed codes. For benchmarking and checking where TensorRT is not installed; unlike
the ort and trt backends it needs torch and diffusers (pip install 'bf[train]').
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bf.errors import BfError
from bf.runtime.exported import ExportedModel


class TorchBackend:
    name = "torch"

    def __init__(self, model: ExportedModel, device: str = "cuda", dtype: str = "float16"):
        try:
            import torch

            from bf.models.graph_modules import TextEncoderGraph, VaeDecoderGraph
            from bf.models.pipeline import load_model
            from bf.models.time_cache import cache_time_features
        except ImportError:
            raise BfError("the torch backend needs PyTorch and diffusers: pip install 'bf[train]'") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise BfError("the torch backend runs on a CUDA GPU and none is visible; use --backend ort")
        source = Path(model.manifest["model"]["source"])
        if not source.exists():
            raise BfError(f"the torch backend runs the model {model.root} was exported from, and {source} is gone")
        self.torch, self.dtype = torch, getattr(torch, dtype)
        pipe = load_model(source, scheduler=model.manifest["scheduler"]["name"]).pipe
        timesteps = torch.as_tensor(model.manifest["scheduler"]["timesteps"])
        self.unet_module = cache_time_features(pipe.unet.float().eval(), timesteps).to(device, self.dtype)
        self.text = TextEncoderGraph(pipe.text_encoder).eval().to(device, self.dtype)
        self.vae = VaeDecoderGraph(pipe.vae).eval().to(device, self.dtype)
        self.device = device
        self.decoded_layers = self._decode_quantized_weights(source) if model.manifest["model"].get("quantized") else 0

    def _decode_quantized_weights(self, source: Path) -> int:
        """Every quantized weight, decoded from its packed codes by the CUDA kernels, in place."""
        from bf.decode_kernels import load
        from bf.format import Checkpoint
        from bf.format.dequant_op import DequantSpec

        torch = self.torch
        layers = Checkpoint.load(source).layers
        weights, outs = [], []
        for name, layer in layers.items():
            w = self.unet_module.unet.get_submodule(name).weight
            weights.append((torch.from_numpy(layer.codes).to(self.device), torch.from_numpy(layer.scale).to(self.device),
                            DequantSpec(layer.shape, layer.grid)))  # fmt: skip
            outs.append(w.data)
        load().decode_cuda_batch(weights, outs)
        torch.cuda.synchronize()
        return len(layers)

    def _run(self, fn, *arrays: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(self.device, (a.dtype == np.int64 and torch.long) or self.dtype) for a in arrays]
            return fn(*args).float().cpu().numpy()

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run(self.text, input_ids.astype(np.int64))

    def unet(self, sample: np.ndarray, step: int, encoder_hidden_states: np.ndarray) -> np.ndarray:
        return self._run(lambda x, c: self.unet_module(x, step, c), sample, encoder_hidden_states)

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self._run(self.vae, latent)
