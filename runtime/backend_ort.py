"""The ONNX Runtime backend: the exported graphs in onnxruntime (CPU, or CUDA with onnxruntime-gpu).

``onnx-std`` exports run as they are; ``onnx`` exports (custom dequant ops) need the op library
built from plugins_trt (libbf_ort_op.so, found as bf.native describes).
"""

from __future__ import annotations

import numpy as np

from bf.errors import BfError
from bf.native import ORT_OP, find_library
from bf.runtime.exported import ExportedModel


class OrtBackend:
    name = "ort"

    def __init__(self, model: ExportedModel, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BfError("the ort backend needs onnxruntime: pip install 'bf[export]'") from None
        options = ort.SessionOptions()
        if model.manifest["target"] != "onnx-std":  # custom dequant ops in the graphs
            options.register_custom_ops_library(str(find_library(ORT_OP)))
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.sessions = {
            name: ort.InferenceSession(str(model.root / graph["file"]), options, providers=providers)
            for name, graph in model.manifest["graphs"].items()
        }
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def unet(self, sample: np.ndarray, step: int, encoder_hidden_states: np.ndarray) -> np.ndarray:
        feeds = {"sample": sample, "step": np.array([step], dtype=np.int64), "encoder_hidden_states": encoder_hidden_states}
        return self.sessions["unet"].run(None, feeds)[0]

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self.sessions["vae_decoder"].run(None, {"latent": latent})[0]
