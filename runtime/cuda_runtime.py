"""The few CUDA runtime calls the TensorRT backend needs (device buffers, copies, a stream),
through ctypes on libcudart: the TensorRT path runs without torch or cupy.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from bf.errors import BfError

LIBRARY_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12")
H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind


def _open_cudart():
    names = [n for n in (ctypes.util.find_library("cudart"), *LIBRARY_NAMES) if n]
    for name in names:
        try:
            return ctypes.CDLL(name), names
        except OSError:
            continue
    return None, names


def gpu_count() -> int | None:
    """CUDA GPUs visible to this process: 0 without a driver or device, None when no CUDA runtime
    library is on the loader's path to ask (onnxruntime-gpu may bring its own)."""
    lib, _ = _open_cudart()
    if lib is None:
        return None
    n = ctypes.c_int(0)
    return n.value if lib.cudaGetDeviceCount(ctypes.byref(n)) == 0 else 0


class CudaRuntime:
    def __init__(self):
        self.lib, names = _open_cudart()
        if self.lib is None:
            raise BfError(
                f"CUDA runtime library not found ({', '.join(names)}); install the CUDA runtime (pip install nvidia-cuda-runtime)"
            )
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise BfError(f"{what} failed: {self.lib.cudaGetErrorString(status).decode()}")

    def compute_capability(self, device: int = 0) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, device), "cudaDeviceGetAttribute")  # major
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device), "cudaDeviceGetAttribute")  # minor
        return f"sm_{major.value}{minor.value}"

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), f"cudaMalloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        self._check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(ptr), a.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(a.nbytes), H2D,
                                             self.stream), "cudaMemcpyAsync")  # fmt: skip
        self.synchronize()  # the host array may go away

    def from_device(self, ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._check(self.lib.cudaMemcpyAsync(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_void_p(ptr), ctypes.c_size_t(out.nbytes), D2H,
                                             self.stream), "cudaMemcpyAsync")  # fmt: skip
        self.synchronize()
        return out

    def synchronize(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    # CUDA graphs (TensorRT's documented recipe: run once after a shape change, then capture
    # execute_async_v3 on the stream and launch the instantiated graph instead).
    def begin_capture(self) -> None:
        self._check(self.lib.cudaStreamBeginCapture(self.stream, 0), "cudaStreamBeginCapture")  # cudaStreamCaptureModeGlobal

    def end_capture(self) -> int:
        """Stop capturing; the instantiated graph (a cudaGraphExec_t handle)."""
        graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.lib.cudaStreamEndCapture(self.stream, ctypes.byref(graph)), "cudaStreamEndCapture")
        try:
            self._check(self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)), "cudaGraphInstantiate")
        finally:
            self.lib.cudaGraphDestroy(graph)
        return exe.value

    def graph_launch(self, exe: int) -> None:
        self._check(self.lib.cudaGraphLaunch(ctypes.c_void_p(exe), self.stream), "cudaGraphLaunch")

    def graph_destroy(self, exe: int) -> None:
        self._check(self.lib.cudaGraphExecDestroy(ctypes.c_void_p(exe)), "cudaGraphExecDestroy")

    def copy_async(self, dst: int, src: int, nbytes: int) -> None:
        """Device to device on the stream (capturable)."""
        self._check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), D2D, self.stream),
                    "cudaMemcpyAsync")  # fmt: skip
