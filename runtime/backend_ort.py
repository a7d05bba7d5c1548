"""The ONNX Runtime backend: the exported graphs in onnxruntime (CPU, or CUDA with onnxruntime-gpu).

``onnx-std`` and ``onnx-qdq`` exports run as they are (DequantizeLinear is an op of the CUDA
execution provider too); ``onnx`` exports (custom dequant ops) need the op library built from
plugins_trt (libbf_ort_op.so, found as bf.native describes), which runs on the CPU.
"""

from __future__ import annotations

import numpy as np

from bf.errors import BfError
from bf.native import ORT_OP, find_library
from bf.ort_options import session_options
from bf.runtime.exported import ExportedModel

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def choose_providers(available: list[str], gpus: int | None, custom_ops: bool) -> list[str]:
    """CUDA first when onnxruntime-gpu is installed and a GPU is visible or cannot be ruled out
    (``gpus`` None), and the graphs need no CPU-only custom op; then the CPU."""
    if CUDA_EP in available and gpus != 0 and not custom_ops:
        return [CUDA_EP, CPU_EP]
    return [CPU_EP]


class OrtBackend:
    name = "ort"

    def __init__(self, model: ExportedModel, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BfError("the ort backend needs onnxruntime: pip install 'bf[export]'") from None
        options = session_options(ort)
        custom = model.manifest.graph_form == "custom"
        if custom:  # custom dequant ops in the graphs
            options.register_custom_ops_library(str(find_library(ORT_OP)))
        if providers is None:
            from bf.runtime.cuda_runtime import gpu_count

            available = ort.get_available_providers()
            providers = choose_providers(available, gpu_count() if CUDA_EP in available else 0, custom)
        self.sessions = {
            name: ort.InferenceSession(str(model.root / graph["file"]), options, providers=providers)
            for name, graph in model.manifest.graphs.items()
        }
        self.provider = self.sessions["unet"].get_providers()[0]  # what ONNX Runtime actually took
        self.device = "cuda" if self.provider == CUDA_EP else "cpu"

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run(None, {"input_ids": input_ids.astype(np.int64)})[0]

    def text_encoder_2(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SDXL's second text encoder: (hidden states, pooled projection)."""
        hidden, pooled = self.sessions["text_encoder_2"].run(None, {"input_ids": input_ids.astype(np.int64)})
        return hidden, pooled

    def unet(self, sample: np.ndarray, step: int, encoder_hidden_states: np.ndarray, added: dict | None = None) -> np.ndarray:
        """``added``: SDXL's text_embeds and time_ids."""
        feeds = {"sample": sample, "step": np.array([step], dtype=np.int64), "encoder_hidden_states": encoder_hidden_states}
        feeds.update(added or {})
        return self.sessions["unet"].run(None, feeds)[0]

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self.sessions["vae_decoder"].run(None, {"latent": latent})[0]
