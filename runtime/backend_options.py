"""How a backend runs an exported model: one typed object from the command line to the backend.

``open_backend`` is the one place that picks the backend class; each backend reads only the
options it understands (ONNX Runtime none, TensorRT the CUDA graph, PyTorch all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from bf.errors import BfError

BACKENDS = ("ort", "trt", "torch")


@dataclass(frozen=True)
class BackendOptions:
    weights: str | None = None  # torch: streamed, decoded or fp (None: streamed for a quantized export, fp otherwise)
    cuda_graph: bool | None = None  # torch, trt: replay the UNet step from a CUDA graph (None: on for torch, off for trt)
    fused: str | None = None  # torch, streamed weights (ring or compiled): the fused low-bit kernels, auto/on/off (None: off)
    keep_decoded_bytes: int = 0  # torch, streamed weights: bytes of the largest weights kept decoded
    compile: bool = False  # torch: the UNet step compiled by torch.compile (streamed weights decoded inside it)
    channels_last: bool = True  # torch: the UNet runs channels-last
    loras: tuple[tuple[str, float], ...] = ()  # torch: LoRA files and scales, low-rank branches beside the UNet's layers
    low_memory: bool = False  # torch: each stage on the GPU only while it runs, the VAE in tiles (TorchBackend)

    def __post_init__(self):
        if self.keep_decoded_bytes < 0:
            raise BfError(f"keep_decoded_bytes={self.keep_decoded_bytes}: must be at least 0")


def open_backend(name: str, model, options: BackendOptions = BackendOptions(), log=lambda msg: None):
    """The runner of backend ``name`` (ort, trt, torch) for an ExportedModel; ``log`` hears what takes long
    the first time (compiling)."""
    if name != "torch" and options.compile:
        raise BfError(f"compile applies to the torch backend, not {name}")
    if name != "torch" and options.low_memory:
        raise BfError(f"low memory applies to the torch backend, not {name}")
    if name != "torch" and options.loras:
        raise BfError(f"a LoRA at run time needs the torch backend; the {name} backend runs the exported graph: put the LoRA "
                      "into it with bf export --lora")  # fmt: skip
    if name == "torch":
        from bf.runtime.backend_torch import TorchBackend

        return TorchBackend(model, weights=options.weights, cuda_graph=options.cuda_graph is not False, fused=options.fused,
                            keep_decoded_bytes=options.keep_decoded_bytes, compile=options.compile,
                            channels_last=options.channels_last, loras=options.loras, low_memory=options.low_memory,
                            log=log)  # fmt: skip
    if name == "trt":
        from bf.runtime.backend_trt import TrtBackend

        return TrtBackend(model, cuda_graph=bool(options.cuda_graph))
    if name == "ort":
        from bf.runtime.backend_ort import OrtBackend

        return OrtBackend(model)
    raise BfError(f"backend {name!r}: must be one of {', '.join(BACKENDS)}")
