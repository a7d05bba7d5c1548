"""The few CUDA runtime calls the TensorRT backend needs (device buffers, copies, a stream),
through ctypes on libcudart: the TensorRT path runs without torch or cupy.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

from bf.errors import BfError

LIBRARY_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12")
H2D, D2H = 1, 2  # cudaMemcpyKind


class CudaRuntime:
    def __init__(self):
        names = [n for n in (ctypes.util.find_library("cudart"), *LIBRARY_NAMES) if n]
        for name in names:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
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
