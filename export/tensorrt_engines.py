"""``--target trt``: one TensorRT engine per graph, with the TensorRT 10 builder API.

Kept thin on purpose: it consumes the ONNX graphs (checked by ``--check``) and the plugin
library (checked by plugins_trt's own tests) and only drives the builder. Engines are cached
under a key of graph hash, export settings, TensorRT version and GPU compute capability.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from bf.atomic import atomic_path
from bf.errors import BfError
from bf.native import register_trt_plugin

CACHE_DIR = Path(os.environ.get("BF_ENGINE_CACHE", Path.home() / ".cache" / "bf" / "engines"))
WORKSPACE_BYTES = 8 << 30


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BfError("--target trt needs TensorRT's Python package: pip install 'bf[trt]' (on a machine with an NVIDIA GPU)") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise BfError(f"TensorRT {trt.__version__} is too old: bf needs TensorRT 10 or newer (pip install 'bf[trt]')")
    return trt


def compute_capability() -> str:
    import torch

    if not torch.cuda.is_available():
        raise BfError("--target trt builds engines for the GPU it runs on, and no CUDA GPU is visible")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def profile_shapes(manifest: dict, graph: str) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every dynamic input: batch 1..max_batch, the export's resolution as opt and max."""
    img = manifest["image"]
    b = img["max_batch"]
    h, w = img["height"] // img["latent_scale"], img["width"] // img["latent_scale"]
    c, tokens, hidden = manifest["latent_channels"], manifest["max_tokens"], manifest["hidden_size"]
    opt_b = min(2, b)
    if graph == "text_encoder":
        return {"input_ids": ((1, tokens), (opt_b, tokens), (b, tokens))}
    if graph == "unet":
        return {
            "sample": ((1, c, 8, 8), (opt_b, c, h, w), (b, c, h, w)),
            "encoder_hidden_states": ((1, tokens, hidden), (opt_b, tokens, hidden), (b, tokens, hidden)),
        }
    return {"latent": ((1, c, 8, 8), (1, c, h, w), (b, c, h, w))}


def build_engines(out: Path, manifest: dict, req, log=lambda m: None) -> dict:
    trt = import_tensorrt()
    cc = compute_capability()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    plugin = register_trt_plugin(trt, req.plugin)
    (out / "engines").mkdir(exist_ok=True)
    shutil.copy2(plugin, out / "engines" / plugin.name)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    timing_path = CACHE_DIR / f"timing-{trt.__version__}-{cc}.cache"
    engines = {}
    for name, graph in manifest["graphs"].items():
        key_src = {"graph": graph["files"], "settings": manifest["export_settings"], "trt": trt.__version__, "gpu": cc}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
        cached = CACHE_DIR / f"{name}-{key}.plan"
        if not cached.is_file():
            log(f"building the {name} engine (TensorRT {trt.__version__}, {cc}); minutes for a full-size UNet")
            plan = _build_one(trt, builder, logger, out / graph["file"], manifest, name, plugin, timing_path)
            with atomic_path(cached) as tmp:
                tmp.write_bytes(plan)
        else:
            log(f"{name} engine: cached ({cached.name})")
        shutil.copy2(cached, out / "engines" / f"{name}.plan")
        engines[name] = {"file": f"engines/{name}.plan", "cache_key": key, "tensorrt": trt.__version__, "gpu": cc}
    return {"plugin": f"engines/{plugin.name}", **engines}


def _build_one(trt, builder, logger, onnx_path: Path, manifest: dict, name: str, plugin: Path, timing_path: Path) -> bytes:
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BfError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if manifest["precision"] == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for inp, (lo, opt, hi) in profile_shapes(manifest, name).items():
        profile.set_shape(inp, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if hasattr(config, "plugins_to_serialize"):  # TensorRT >= 10.0: the plugin travels inside the engine
        config.plugins_to_serialize = [str(plugin)]
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BfError(f"TensorRT failed to build the {name} engine (see its log above)")
    with atomic_path(timing_path) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
