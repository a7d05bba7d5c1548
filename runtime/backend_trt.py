"""The TensorRT backend: the engines `bf export --target trt` built, with the LowBitDequant plugin,
through the TensorRT 10 Python API (deserialize, execution context, execute_async_v3) and the
CUDA runtime through ctypes; no torch.

Written against TensorRT's documented API and tested only where TensorRT is installed
(tests/test_runtime_trt.py skips elsewhere): TensorRT cannot be installed on the machines this
was written on. Everything it consumes (graphs, plugin op, kernels) is checked elsewhere.
"""

from __future__ import annotations

import numpy as np

from bf.errors import BfError
from bf.native import register_trt_plugin
from bf.runtime.cuda_runtime import CudaRuntime
from bf.runtime.exported import ExportedModel


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BfError("the trt backend needs TensorRT's Python package: pip install 'bf[trt]' (on a machine with an NVIDIA GPU)") from None
    return trt


class TrtBackend:
    name = "trt"

    def __init__(self, model: ExportedModel, cuda_graph: bool = False):
        engines = model.manifest.get("engines")
        if not engines:
            raise BfError(f"{model.root} has no TensorRT engines; export with --target trt, or use --backend ort")
        trt = import_tensorrt()
        self.cuda = CudaRuntime()
        here = {"tensorrt": trt.__version__, "gpu": self.cuda.compute_capability()}
        for name in ("text_encoder", "unet", "vae_decoder"):
            built = {k: engines[name][k] for k in ("tensorrt", "gpu")}
            if built != here:
                raise BfError(
                    f"{model.root}: the {name} engine was built for TensorRT {built['tensorrt']} on {built['gpu']}, this machine has "
                    f"TensorRT {here['tensorrt']} on {here['gpu']}; export again here with --target trt"
                )
        register_trt_plugin(trt, model.root / engines["plugin"])
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.contexts = {}
        for name in ("text_encoder", "unet", "vae_decoder"):
            engine = runtime.deserialize_cuda_engine((model.root / engines[name]["file"]).read_bytes())
            if engine is None:
                raise BfError(f"TensorRT could not load {engines[name]['file']} (see its log); export again here with --target trt")
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

    def _run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
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
        out = outputs[0]
        return self.cuda.from_device(self.buffers[(graph, out)][0], shapes[out], trt.nptype(engine.get_tensor_dtype(out))).astype(
            np.float32
        )

    def text_encoder(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text_encoder", {"input_ids": input_ids})

    def unet(self, sample: np.ndarray, step: int, encoder_hidden_states: np.ndarray) -> np.ndarray:
        feeds = {"sample": sample, "step": np.array([step], dtype=np.int64), "encoder_hidden_states": encoder_hidden_states}
        return self._run("unet", feeds)

    def vae_decoder(self, latent: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {"latent": latent})
