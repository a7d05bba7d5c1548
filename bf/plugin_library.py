"""Finding the TensorRT plugin library of the dequant op (built from plugins_trt/).

Shared by ``bf export --target trt`` and the runtime's TensorRT backend. Searched in order:
an explicit path, ``$BF_PLUGIN_LIB``, the installed package (``bf/lib``), the source tree's
``plugins_trt/build``.
"""

from __future__ import annotations

import os
from pathlib import Path

from bf.errors import BfError

LIBRARY_NAME = "libbf_trt_plugin.so"
ENV_VAR = "BF_PLUGIN_LIB"


def candidate_paths(explicit: Path | None = None) -> list[Path]:
    here = Path(__file__).resolve().parent
    paths = [Path(explicit)] if explicit else []
    if os.environ.get(ENV_VAR):
        paths.append(Path(os.environ[ENV_VAR]))
    return [*paths, here / "lib" / LIBRARY_NAME, here.parent / "plugins_trt" / "build" / LIBRARY_NAME]


def find_plugin_library(explicit: Path | None = None) -> Path:
    """The first existing candidate; BfError listing where it looked and how to build one."""
    paths = candidate_paths(explicit)
    if explicit is not None and not Path(explicit).is_file():
        raise BfError(f"--plugin {explicit}: no such file; build it with 'make -C plugins_trt' or drop --plugin")
    for p in paths:
        if p.is_file():
            return p
    looked = ", ".join(str(p) for p in paths)
    raise BfError(
        f"TensorRT plugin library {LIBRARY_NAME} not found (looked in {looked}); build it with 'make -C plugins_trt' or set {ENV_VAR}"
    )
