"""The two TensorRT builds bf drives with one code path: TensorRT (``tensorrt``, 10 or newer) and
TensorRT for RTX (``tensorrt_rtx``), whose Python APIs are the same family.

TensorRT builds an engine for the GPU it runs on. TensorRT for RTX builds ahead of time, on a
machine with or without a GPU, for the RTX-class compute capabilities named at build time, and
runs only on those. Both are strongly typed here: an engine's precision is its graph's.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from bf.errors import BfError


@dataclass(frozen=True)
class TensorRTFlavor:
    target: str  # bf export --target
    module: str  # the Python module
    label: str  # for messages
    extra: str  # pip install 'bf[extra]'
    min_major: int
    core_library: str | None = None  # loaded with RTLD_GLOBAL before a plugin library (its symbols resolve there)

    @property
    def install_hint(self) -> str:
        return f"pip install 'bf[{self.extra}]'"

    def load(self, purpose: str | None = None):
        """The Python module; BfError saying how to install it when it is missing or too old."""
        try:
            trt = importlib.import_module(self.module)
        except ImportError:
            purpose = purpose or f"--target {self.target}"
            raise BfError(f"{purpose} needs {self.label}'s Python package ({self.module}): {self.install_hint}") from None
        if int(trt.__version__.split(".")[0]) < self.min_major:
            raise BfError(f"{self.label} {trt.__version__} is too old: bf needs {self.min_major} or newer ({self.install_hint})")
        if self.core_library:
            _load_global(trt, self.core_library)
        return trt


TENSORRT = TensorRTFlavor("trt", "tensorrt", "TensorRT", "trt", 10)
TENSORRT_RTX = TensorRTFlavor("trt-rtx", "tensorrt_rtx", "TensorRT for RTX", "trt-rtx", 1, core_library="libtensorrt_rtx.so.1")
FLAVORS = {f.target: f for f in (TENSORRT, TENSORRT_RTX)}
RUNTIME_MODULES = {f.module: f for f in FLAVORS.values()}  # what an engine records as its runtime


def _load_global(trt, name: str) -> None:
    """TensorRT for RTX's core library with RTLD_GLOBAL, so a plugin library's TensorRT symbols resolve."""
    libs = importlib.import_module(f"{trt.__name__}_libs") if importlib.util.find_spec(f"{trt.__name__}_libs") else None
    where = Path(libs.__file__).parent / name if libs else Path(name)
    try:
        ctypes.CDLL(str(where) if where.exists() else name, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise BfError(f"{name} could not be loaded ({e}); reinstall TensorRT for RTX: pip install 'bf[trt-rtx]'") from None


# TensorRT for RTX's targets, as --gpu-arch numbers (compute capability without the dot).
RTX_ARCHS = {"75": "SM75", "80": "SM80", "86": "SM86", "89": "SM89", "120": "SM120", "121": "SM121"}
DEFAULT_RTX_ARCHS = ("86", "89", "120")  # RTX 30, 40 and 50 series


def rtx_archs(trt, archs: tuple[str, ...]) -> list:
    """``trt.ComputeCapability`` members for ``archs``; BfError for one this TensorRT for RTX does not know."""
    known = {a: getattr(trt.ComputeCapability, m) for a, m in RTX_ARCHS.items() if hasattr(trt.ComputeCapability, m)}
    bad = [a for a in archs if a not in known]
    if bad or not archs:
        raise BfError(
            f"--gpu-arch {','.join(bad) or '(none)'}: TensorRT for RTX {trt.__version__} builds for compute capability "
            f"{', '.join(known)} (RTX-class GPUs; give them as e.g. 86,89,120)"
        )
    return [known[a] for a in archs]


def arch_name(cc: str) -> str:
    """'sm_86', '8.6' or '86' -> '86'."""
    return cc.strip().removeprefix("sm_").replace(".", "")


# What TensorRT for RTX logs as errors while it builds on a machine without a usable GPU, although
# the build succeeds: it probes the CUDA driver. Shown only when the build fails.
NO_GPU_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "cudaError 100", "no CUDA-capable device")
# Warnings about what bf already does: the runtime binds the int64 inputs (input_ids, step) as int64.
EXPECTED_WARNINGS = ("has Int64 binding",)


def make_logger(trt, emit, min_severity=None):
    """A TensorRT logger that sends warnings and errors to ``emit`` (one line each) and keeps the errors in
    ``logger.errors`` (for the one-line error that follows a failure), holding back the no-GPU probe
    errors above in ``logger.held`` (printed by the caller if the build fails)."""
    threshold = trt.Logger.WARNING if min_severity is None else min_severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.held: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity > threshold:  # lower values are more severe
                return
            if any(s in msg for s in NO_GPU_NOISE):
                self.held.append(msg)
                return
            if severity > trt.Logger.ERROR and any(s in msg for s in EXPECTED_WARNINGS):
                return
            line = msg.strip().splitlines()[0] if msg.strip() else ""
            if severity <= trt.Logger.ERROR:
                self.errors.append(line)
            emit(f"{'error' if severity <= trt.Logger.ERROR else 'warning'} ({trt.__name__}): {line}")

    return _Logger()
