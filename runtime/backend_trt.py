"""The TensorRT backend: the engines of a ``--target trt`` or ``--target trt-rtx`` export, through
TensorRT's Python API (``tensorrt`` or ``tensorrt_rtx``, same family: deserialize, execution
context, execute_async_v3) and the CUDA runtime through ctypes; no torch.

Before anything is loaded, the engines' target GPUs (in the manifest) are compared with this
GPU: a TensorRT engine runs on the GPU it was built on, a TensorRT for RTX engine on the RTX-class
compute capabilities it was built for, and anything else is refused in one line.
"""

from __future__ import annotations

import sys

import numpy as np

from bf.errors import BfError
from bf.native import register_trt_plugin
from bf.runtime.cuda_runtime import CudaRuntime, gpu_count
from bf.runtime.exported import ExportedModel
from bf.tensorrt_flavors import RTX_ARCHS, RUNTIME_MODULES, TENSORRT, arch_name, make_logger


def engine_gpus(engine: dict) -> list[str]:
    """The compute capabilities an engine was built for ("86"); older manifests wrote one "gpu": "sm_86"."""
    return [arch_name(g) for g in engine.get("gpus") or [engine["gpu"]]]


def check_engines_fit(model: ExportedModel, engines: dict, local_cc: str) -> None:
    """Refuse, in one line, engines that were not built for this GPU (``local_cc`` like "sm_90")."""
    here = arch_name(local_cc)
    for name in model.manifest.graph_names:
        e = engines[name]
        flavor = RUNTIME_MODULES.get(e.get("runtime", TENSORRT.module), TENSORRT)
        gpus = engine_gpus(e)
        if here not in gpus:
            if flavor is TENSORRT:
                raise BfError(f"{model.root}: the {name} engine was built for TensorRT {e['tensorrt']} on sm_{gpus[0]}, this GPU is "
                              f"{local_cc}; export again on this machine with --target trt, or use --backend torch")  # fmt: skip
            again = (f"export again with --target trt-rtx --gpu-arch {here}, or" if here in RTX_ARCHS else
                     f"{flavor.label} does not build for it (RTX-class GPUs: {', '.join(RTX_ARCHS)}):")  # fmt: skip
            raise BfError(f"{model.root}: the {flavor.label} engines were built for compute capability {', '.join(gpus)} and this GPU "
                          f"is {local_cc}; {again} use --backend torch or ort")  # fmt: skip


class TrtBackend:
    name = "trt"

    def __init__(self, model: ExportedModel, cuda_graph: bool = False):
        engines = model.manifest.engines
        if not engines:
            raise BfError(f"{model.root} has no TensorRT engines; export with --target trt or trt-rtx, or use --backend ort")
        if gpu_count() == 0:  # None: no CUDA runtime library to ask; CudaRuntime says what to install
            raise BfError("the trt backend runs TensorRT engines on a CUDA GPU and none is visible here; use --backend ort")
        self.cuda = CudaRuntime()
        check_engines_fit(model, engines, self.cuda.compute_capability())
        flavor = RUNTIME_MODULES.get(engines["unet"].get("runtime", TENSORRT.module), TENSORRT)
        trt = flavor.load(f"--backend trt on {flavor.label} engines")
        if flavor is TENSORRT and engines["unet"]["tensorrt"] != trt.__version__:
            raise BfError(f"{model.root}: the engines were built with TensorRT {engines['unet']['tensorrt']}, this machine has TensorRT "
                          f"{trt.__version__}; export again here with --target trt")  # fmt: skip
        self.trt = trt
        self.logger = make_logger(trt, lambda m: print(m, file=sys.stderr))
        runtime = trt.Runtime(self.logger)  # a logger must exist before a plugin library is loaded
        if engines.get("plugin"):
            register_trt_plugin(trt, model.root / engines["plugin"])
        self.contexts = {}
        for name in model.manifest.graph_names:
            engine = runtime.deserialize_cuda_engine((model.root / engines[name]["file"]).read_bytes())
            if engine is None:
                why = "; ".join(self.logger.errors + self.logger.held) or "see its log"
                raise BfError(f"{flavor.label} {trt.__version__} could not load {engines[name]['file']} ({why}); "
                              f"export again with this {flavor.label}")  # fmt: skip
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            self.contexts[name] = (engine, engine.create_execution_context(), outputs)
        self.buffers: dict[tuple[str, str], tuple[int, int]] = {}  # (graph, tensor) -> (pointer, bytes), grown on demand
        self.cuda_graph = cuda_graph
        self.graphs: dict[tuple, int] = {}  # UNet input shapes -> instantiated CUDA graph over the buffers above

    def _buffer(self, graph: str, tensor: str, nbytes: int) -> int:
        ptr, size = self.buffers.get((graph, tensor), (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            self._drop_graphs()  # they hold the old addresses
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self.buffers[(graph, tensor)] = (ptr, size)
        return ptr

    def _drop_graphs(self) -> None:
        for exe in self.graphs.values():
            self.cuda.graph_destroy(exe)
        self.graphs = {}

    def _execute(self, graph: str, context, key: tuple) -> None:
        """execute_async_v3, or with cuda_graph the UNet's captured graph for these shapes (captured after one plain run)."""
        if not (self.cuda_graph and graph == "unet"):
            ok = context.execute_async_v3(self.cuda.stream.value)
        elif key in self.graphs:
            self.cuda.graph_launch(self.graphs[key])
            ok = True
        else:
            ok = context.execute_async_v3(self.cuda.stream.value)  # also applies the new shapes before capture
            self.cuda.begin_capture()
            try:
                captured = context.execute_async_v3(self.cuda.stream.value)
            finally:
                exe = self.cuda.end_capture()
            if captured:
                self.graphs[key] = exe
            else:
                self.cuda.graph_destroy(exe)
        if not ok:
            raise BfError(f"TensorRT failed to run the {graph} engine (see its log)")

    def _run(self, graph: str, inputs: dict[str, np.ndarray], every: bool = False):
        """The first output (``every``: all outputs, in the engine's order), as float32."""
        trt = self.trt
        engine, context, outputs = self.contexts[graph]  # tensor names read once at load, not every UNet step
        for name, array in inputs.items():
            array = np.ascontiguousarray(array, dtype=trt.nptype(engine.get_tensor_dtype(name)))
            context.set_input_shape(name, array.shape)
            ptr = self._buffer(graph, name, array.nbytes)
            self.cuda.to_device(ptr, array)
            context.set_tensor_address(name, ptr)
        shapes = {}
        for name in outputs:
            shapes[name] = tuple(context.get_tensor_shape(name))
            dtype = trt.nptype(engine.get_tensor_dtype(name))
            context.set_tensor_address(name, self._buffer(graph, name, int(np.prod(shapes[name])) * np.dtype(dtype).itemsize))
        self._execute(graph, context, tuple(a.shape for a in inputs.values()))
        arrays = [
            self.cuda.from_device(self.buffers[(graph, out)][0], shapes[out], trt.nptype(engine.get_tensor_dtype(out))).astype(np.float32)
            for out in (outputs if every else outputs[:1])
        ]
        return arrays if every else arrays[0]

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text_encoder", {"input_ids": input_ids})

    def text_encoder_2(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.contexts["text_encoder_2"][2]
        out = dict(zip(outputs, self._run("text_encoder_2", {"input_ids": input_ids}, every=True), strict=True))
        return out["hidden_states"], out["text_embeds"]

    def unet(self, sample: np.ndarray, step: int, encoder_hidden_states: np.ndarray, added: dict | None = None) -> np.ndarray:
        feeds = {"sample": sample, "step": np.array([step], dtype=np.int64), "encoder_hidden_states": encoder_hidden_states}
        feeds.update(added or {})
        return self._run("unet", feeds)

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {"latent": latent})
