"""Finding and loading the native libraries built from plugins_trt/ (``make plugins``).

- ``libbf_decode.so``: the decode kernels behind a C ABI (plugins_trt/include/bf_decode.h),
  loaded with ctypes by :mod:`bf.decode_kernels`; no TensorRT needed.
- ``libbf_trt_plugin.so``: the TensorRT plugin of the dequant op (``bf export --target trt``,
  the TensorRT runtime backend).
- ``libbf_ort_op.so``: the same op for ONNX Runtime, to run custom-op graphs without lowering.
- ``libbf_trt_rtx_alias.so``: built beside the plugin when TensorRT for RTX is found; its ONNX parser
  opens ``libtensorrt_rtx.so`` by a name its wheel does not ship (plugins_trt/src/trt_rtx_alias.cpp).

Each is searched in order: an explicit path, its environment variable, the installed package
(``bf/lib``), the source tree's ``plugins_trt/build``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bf.errors import BfError

BUILD_HINT = "build it with 'make plugins' (see plugins_trt/README.md)"


@dataclass(frozen=True)
class NativeLibrary:
    file_name: str
    env_var: str
    what: str


DECODE = NativeLibrary("libbf_decode.so", "BF_DECODE_LIB", "decode kernel library")
TRT_PLUGIN = NativeLibrary("libbf_trt_plugin.so", "BF_PLUGIN_LIB", "TensorRT plugin library")
ORT_OP = NativeLibrary("libbf_ort_op.so", "BF_ORT_OP_LIB", "ONNX Runtime custom-op library")
TRT_RTX_ALIAS = NativeLibrary("libbf_trt_rtx_alias.so", "BF_TRT_RTX_ALIAS_LIB", "TensorRT for RTX alias library")


def candidate_paths(lib: NativeLibrary, explicit: Path | None = None) -> list[Path]:
    here = Path(__file__).resolve().parent
    paths = [Path(explicit)] if explicit else []
    if os.environ.get(lib.env_var):
        paths.append(Path(os.environ[lib.env_var]))
    return [*paths, here / "lib" / lib.file_name, here.parent / "plugins_trt" / "build" / lib.file_name]


def find_library(lib: NativeLibrary, explicit: Path | None = None) -> Path:
    """The first existing candidate; BfError listing where it looked and how to build one."""
    if explicit is not None and not Path(explicit).is_file():
        raise BfError(f"{explicit}: no such file (the {lib.what}); {BUILD_HINT}")
    paths = candidate_paths(lib, explicit)
    for p in paths:
        if p.is_file():
            return p
    looked = ", ".join(str(p) for p in paths)
    raise BfError(f"{lib.what} {lib.file_name} not found (looked in {looked}); {BUILD_HINT} or set {lib.env_var}")


def find_plugin_library(explicit: Path | None = None) -> Path:
    return find_library(TRT_PLUGIN, explicit)


def find_trt_rtx_alias(plugin: Path) -> Path:
    """The alias library next to ``plugin``, else where libraries are looked for."""
    alias = Path(plugin).parent / TRT_RTX_ALIAS.file_name
    return alias if alias.is_file() else find_library(TRT_RTX_ALIAS)


def register_trt_plugin(trt, explicit: Path | None = None, for_parser: bool = False) -> Path:
    """Load the plugin library into TensorRT's registry and check its creator is the one this bf needs.

    ``for_parser``: TensorRT for RTX's ONNX parser will meet plugin nodes, so its alias library is
    loaded first. Create a TensorRT logger (a Builder or Runtime) before calling: TensorRT for RTX's
    ``load_library`` fails without one."""
    import ctypes

    from bf.format.dequant_op import OP_TYPE, OP_VERSION, PLUGIN_NAMESPACE

    path = find_plugin_library(explicit)
    if for_parser and trt.__name__ == "tensorrt_rtx":
        alias = find_trt_rtx_alias(path)
        try:
            ctypes.CDLL(str(alias), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise BfError(f"{alias} could not be loaded ({e}); {BUILD_HINT}") from None
    registry = trt.get_plugin_registry()
    try:
        handle = registry.load_library(str(path))
    except Exception as e:  # TensorRT raises its own types; the message is what matters
        raise BfError(f"TensorRT {trt.__version__} could not load {path}: {e}; rebuild it against this TensorRT ({BUILD_HINT})") from None
    if handle is None and registry.get_creator(OP_TYPE, str(OP_VERSION), PLUGIN_NAMESPACE) is None:
        raise BfError(
            f"{trt.__name__} {trt.__version__} could not load {path} (see its log); rebuild it against this TensorRT ({BUILD_HINT})"
        )
    if registry.get_creator(OP_TYPE, str(OP_VERSION), PLUGIN_NAMESPACE) is None:
        raise BfError(f"{path} does not provide {OP_TYPE} version {OP_VERSION}: it was built for another bf; {BUILD_HINT}")
    return path
