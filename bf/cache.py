"""bf's cache: the one root for what bf makes for itself and can make again.

``$BF_CACHE`` (default ``~/.cache/bf``) holds the exports bf makes on its own (the shipped model for
``bf infer`` and ``bf bench`` without a target, a .bfq given to ``bf bench``, baselines), and
``engines/`` the TensorRT engines, timing caches included (``$BF_ENGINE_CACHE`` moves them alone).
Read on every call, so a process can change the variables.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("BF_CACHE") or Path.home() / ".cache" / "bf")


def engine_cache() -> Path:
    return Path(os.environ.get("BF_ENGINE_CACHE") or cache_root() / "engines")
