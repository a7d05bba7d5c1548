"""The decode kernels of plugins_trt (libbf_decode.so) from Python, through ctypes.

The same code the TensorRT plugin runs: ``decode_cpu`` on numpy arrays, ``decode_cuda`` on
torch CUDA tensors (the PyTorch runtime path decodes its weights with it). Both produce the op's
output (bf/format/dequant_op.py) bit for bit; tests compare them with ``reference_dequant``.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np

from bf.errors import BfError
from bf.format.dequant_op import ABI_VERSION, DTYPES, DequantSpec
from bf.format.packing import rows_and_len
from bf.native import BUILD_HINT, DECODE, find_library

GRID_CODES = {"balanced": 0, "plain": 1}
DTYPE_CODES = {name: code for code, name in DTYPES.items()}  # the C ABI numbers dtypes as ONNX does


class _Desc(ctypes.Structure):
    _fields_ = [
        ("rows", ctypes.c_int64),
        ("row_len", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("grid", ctypes.c_int32),
        ("levels", ctypes.c_int32),
        ("per_field", ctypes.c_int32),
        ("field_bits", ctypes.c_int32),
        ("out_dtype", ctypes.c_int32),
        ("scale_dtype", ctypes.c_int32),
    ]


class DecodeLibrary:
    def __init__(self, path: Path):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise BfError(f"cannot load {path}: {e}; {BUILD_HINT}") from None
        lib.bf_abi_version.restype = ctypes.c_int32
        if lib.bf_abi_version() != ABI_VERSION:
            raise BfError(f"{path} has ABI version {lib.bf_abi_version()}, this bf needs {ABI_VERSION}: rebuild it ({BUILD_HINT})")
        lib.bf_status_string.restype = ctypes.c_char_p
        lib.bf_status_string.argtypes = [ctypes.c_int32]
        lib.bf_has_cuda.restype = ctypes.c_int32
        args = [ctypes.POINTER(_Desc), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        lib.bf_decode_cpu.argtypes = args
        lib.bf_decode_cpu.restype = ctypes.c_int32
        lib.bf_decode_cuda.argtypes = [*args, ctypes.c_void_p]
        lib.bf_decode_cuda.restype = ctypes.c_int32
        p = ctypes.c_void_p
        lib.bf_decode_cuda_batch.argtypes = [ctypes.POINTER(_Desc), p, p, p, p, ctypes.c_int32, ctypes.c_int32, p]
        lib.bf_decode_cuda_batch.restype = ctypes.c_int32
        self.path, self._lib = path, lib

    @property
    def has_cuda(self) -> bool:
        return bool(self._lib.bf_has_cuda())

    def _check(self, status: int, spec: DequantSpec) -> None:
        if status != 0:
            reason = self._lib.bf_status_string(status).decode()
            raise BfError(f"decode of a {list(spec.shape)} {spec.grid.bits}-bit {spec.grid.kind} weight: {reason}")

    @staticmethod
    def _desc(spec: DequantSpec, scale_dtype: str, out_dtype: str) -> _Desc:
        p = spec.packing
        row_len = rows_and_len(spec.shape)[1]
        return _Desc(spec.shape[0], row_len, spec.grid.bits, GRID_CODES[spec.grid.kind], p.levels, p.per_field, p.field_bits,
                     DTYPE_CODES[out_dtype], DTYPE_CODES[scale_dtype])  # fmt: skip

    def decode_cpu(self, codes: np.ndarray, scale: np.ndarray, spec: DequantSpec, out_dtype: str = "float32") -> np.ndarray:
        """The weight on the host; bfloat16 comes back as its raw uint16 bits."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        scale = np.ascontiguousarray(scale)
        out = np.empty(spec.shape, dtype=np.float32 if out_dtype == "float32" else np.uint16 if out_dtype == "bfloat16" else np.float16)
        desc = self._desc(spec, scale.dtype.name, out_dtype)
        self._check(self._lib.bf_decode_cpu(ctypes.byref(desc), codes.ctypes.data, codes.size, scale.ctypes.data, out.ctypes.data), spec)
        return out

    @staticmethod
    def _check_cuda(codes, scale, out, spec: DequantSpec) -> tuple[str, str]:
        import torch

        names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        if not all(t.is_cuda and t.is_contiguous() for t in (codes, scale, out)):
            raise BfError("decode_cuda needs contiguous CUDA tensors")
        if codes.dtype != torch.uint8 or scale.dtype not in (torch.float32, torch.float16) or out.dtype not in names:
            raise BfError(
                "decode_cuda: codes must be uint8, scale float32/float16 and out float32/float16/bfloat16, "
                f"got {codes.dtype}, {scale.dtype}, {out.dtype}"
            )
        if tuple(out.shape) != spec.shape:
            raise BfError(f"decode_cuda: out has shape {tuple(out.shape)}, the weight is {spec.shape}")
        return names[scale.dtype], names[out.dtype]

    def decode_cuda_batch(self, weights: list, outs: list, max_blocks: int = 0) -> None:
        """Decode many weights, ``(codes, scale, spec)`` each, into ``outs`` (same dtype) in as few launches as possible.

        ``max_blocks`` > 0 caps each launch's grid (its blocks loop over the work), so a decode
        beside other kernels occupies that many multiprocessors at most.

        The host-side descriptor arrays are copied into the launch's parameters, so a CUDA graph
        capturing this call replays it without them.
        """
        import torch

        n = len(weights)
        if n != len(outs):
            raise BfError(f"decode_cuda_batch: {n} weights but {len(outs)} outputs")
        descs = (_Desc * n)()
        ptrs = [(ctypes.c_void_p * n)() for _ in range(3)]
        nbytes = (ctypes.c_int64 * n)()
        for i, ((codes, scale, spec), out) in enumerate(zip(weights, outs, strict=True)):
            scale_name, out_name = self._check_cuda(codes, scale, out, spec)
            descs[i] = self._desc(spec, scale_name, out_name)
            ptrs[0][i], ptrs[1][i], ptrs[2][i] = codes.data_ptr(), scale.data_ptr(), out.data_ptr()
            nbytes[i] = codes.numel()
        stream = torch.cuda.current_stream().cuda_stream
        status = self._lib.bf_decode_cuda_batch(descs, ptrs[0], nbytes, ptrs[1], ptrs[2], n, max_blocks, stream)
        if status != 0:
            raise BfError(f"batched decode of {n} weights: {self._lib.bf_status_string(status).decode()}")

    def decode_cuda(self, codes, scale, spec: DequantSpec, out=None, dtype=None):
        """Decode into ``out`` (a CUDA tensor of spec.shape; allocated as ``dtype`` when None) on torch's current stream."""
        import torch

        if out is None:
            out = torch.empty(spec.shape, dtype=dtype or torch.float32, device=codes.device)
        scale = scale.contiguous()
        scale_name, out_name = self._check_cuda(codes, scale, out, spec)
        desc = self._desc(spec, scale_name, out_name)
        stream = torch.cuda.current_stream(codes.device).cuda_stream
        status = self._lib.bf_decode_cuda(ctypes.byref(desc), codes.data_ptr(), codes.numel(), scale.data_ptr(), out.data_ptr(), stream)
        self._check(status, spec)
        return out


@cache
def load(path: Path | None = None) -> DecodeLibrary:
    """The decode library, found as bf.native describes (BF_DECODE_LIB, bf/lib, plugins_trt/build)."""
    return DecodeLibrary(find_library(DECODE, path))
