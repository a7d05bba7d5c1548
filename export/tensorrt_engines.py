"""``--target trt`` and ``--target trt-rtx``: one engine per exported graph, one code path.

TensorRT builds for the GPU it runs on; TensorRT for RTX builds ahead of time, on a CPU too,
for the compute capabilities given with ``--gpu-arch``. Both networks are strongly typed, so an
fp16 engine is built from a float16 copy of the graph (``bf.export.fp16_graph``). The quantized
weights reach the builder either as ``DequantizeLinear`` over INT4/INT8 constants (``--weights
qdq``) or as LowBitDequant plugin nodes over the packed codes (``--weights plugin``).

Engines are cached under a key of graph hash, export settings, TensorRT flavour and version and
target GPUs, so exporting the same model again does not build again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import bf
from bf.atomic import atomic_path
from bf.cache import engine_cache
from bf.errors import BfError
from bf.export.exporter import sha256_file
from bf.export.fp16_graph import to_fp16
from bf.export.onnx_graphs import save_graph
from bf.format.dequant_op import DOMAIN, OP_TYPE
from bf.native import find_plugin_library, find_trt_rtx_alias, register_trt_plugin
from bf.tensorrt_flavors import FLAVORS, make_logger, rtx_archs

WORKSPACE_BYTES = 8 << 30
MIN_LATENT = 8  # the smallest latent side of the profiles (TensorRT's shape analysis refuses 1 at the up-block concat)


def prepare(req) -> list[str]:
    """Everything the engines need, checked before minutes of tracing: the TensorRT module, the
    plugin library for ``--weights plugin``, and the target GPUs (names like "86")."""
    flavor = FLAVORS[req.target]
    trt = flavor.load()
    if req.weights == "plugin":
        plugin = find_plugin_library(req.plugin)
        if req.target == "trt-rtx":
            find_trt_rtx_alias(plugin)
    if req.target == "trt-rtx":
        rtx_archs(trt, req.gpu_archs)
        return list(req.gpu_archs)
    return [local_compute_capability()]


def local_compute_capability() -> str:
    import torch

    if not torch.cuda.is_available():
        raise BfError("--target trt builds engines for the GPU it runs on, and no CUDA GPU is visible; --target trt-rtx builds on a CPU")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def profile_shapes(manifest: dict, graph: str) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every dynamic input: batch 1..max_batch, the export's resolution as opt and max."""
    img = manifest["image"]
    b = img["max_batch"]
    h, w = img["height"] // img["latent_scale"], img["width"] // img["latent_scale"]
    c, tokens, hidden = manifest["latent_channels"], manifest["max_tokens"], manifest["hidden_size"]
    opt_b = min(2, b)
    lo = (min(MIN_LATENT, h), min(MIN_LATENT, w))
    if graph in ("text_encoder", "text_encoder_2"):
        return {"input_ids": ((1, tokens), (opt_b, tokens), (b, tokens))}
    if graph == "unet":
        shapes = {
            "sample": ((1, c, *lo), (opt_b, c, h, w), (b, c, h, w)),
            "encoder_hidden_states": ((1, tokens, hidden), (opt_b, tokens, hidden), (b, tokens, hidden)),
        }
        if manifest.get("family") == "sdxl":
            pooled = manifest["pooled_size"]
            shapes["text_embeds"] = ((1, pooled), (opt_b, pooled), (b, pooled))
            shapes["time_ids"] = ((1, 6), (opt_b, 6), (b, 6))
        return shapes
    return {"latent": ((1, c, *lo), (1, c, h, w), (b, c, h, w))}


def engine_precision(manifest: dict, graph: str) -> str:
    """The export's precision, but float32 for a VAE decoder that overflows in float16 (SDXL's: ``vae_upcast``)."""
    return "fp32" if graph == "vae_decoder" and manifest.get("vae_upcast") else manifest["precision"]


def build_engines(out: Path, manifest: dict, req, targets: list[str], log=lambda m: None) -> dict:
    """Build (or take from the cache) the engine of every graph in ``out``; the manifest's ``engines``."""
    flavor = FLAVORS[req.target]
    trt = flavor.load()
    logger = make_logger(trt, log)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    # The plugin library is copied beside the engines, not serialized into them (that would add its
    # size to every engine); the trt backend registers it from there before deserializing.
    plugin = register_trt_plugin(trt, req.plugin, for_parser=True) if req.weights == "plugin" else None
    (out / "engines").mkdir(exist_ok=True)
    if plugin is not None:
        shutil.copy2(plugin, out / "engines" / plugin.name)
    cache = engine_cache()
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{flavor.module}-{trt.__version__}-{'_'.join(targets)}"
    timing_path = cache / f"timing-{tag}.cache"
    archs = rtx_archs(trt, tuple(targets)) if req.target == "trt-rtx" else None
    settings = {k: v for k, v in manifest["export_settings"].items() if k != "check"}
    # bf's version: the float16 copy, the profiles and the plugin's field layout are made by this code
    common = {"settings": settings, "runtime": flavor.module, "version": trt.__version__, "gpus": targets, "bf": bf.__version__,
              "plugin": sha256_file(plugin) if plugin else None}  # fmt: skip
    engines = {}
    for name, graph in manifest["graphs"].items():
        precision = engine_precision(manifest, name)
        key_src = {"graph": graph["files"], **common, "precision": precision}
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
        cached = cache / f"{name}-{key}.plan"
        t0, hit = time.time(), cached.is_file()
        if not hit:
            log(f"building the {name} engine ({flavor.label} {trt.__version__}, {precision}, for {', '.join(targets)}); "
                "minutes for a full-size UNet")  # fmt: skip
            plan = _build_one(trt, builder, logger, out / graph["file"], manifest, name, req, archs, timing_path)
            with atomic_path(cached) as tmp:
                tmp.write_bytes(plan)
            log(f"{name} engine: {len(plan) / 1e6:.1f} MB in {time.time() - t0:.0f} s")
        else:
            log(f"{name} engine: cached ({cached.name})")
        shutil.copy2(cached, out / "engines" / f"{name}.plan")
        seconds = None if hit else round(time.time() - t0, 2)
        engines[name] = {"file": f"engines/{name}.plan", "bytes": cached.stat().st_size, "cache_key": key, "runtime": flavor.module,
                         "tensorrt": trt.__version__, "gpus": targets, "build_seconds": seconds, "cached": hit,
                         "precision": precision}  # fmt: skip
    return {"plugin": f"engines/{plugin.name}" if plugin else None, **engines}


def codes_as_int8(model: onnx.ModelProto) -> None:
    """The LowBitDequant nodes' packed codes as int8 (the same bytes), in place: TensorRT for RTX takes
    no uint8 plugin tensors and its parser widens uint8 constants to int32; the plugin reads either."""
    codes = {n.input[0] for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE}
    for t in model.graph.initializer:
        if t.name in codes and t.data_type == onnx.TensorProto.UINT8:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).view(np.int8), t.name))


def _graph_for_builder(onnx_path: Path, precision: str, scratch: Path) -> Path:
    """The file the builder parses: the exported graph with int8 codes, as float16 for an fp16 engine."""
    model = onnx.load(str(onnx_path))  # external data loaded from beside onnx_path
    if precision == "fp16":
        model = to_fp16(model, copy=False)
    codes_as_int8(model)
    return save_graph(model, scratch / onnx_path.name)[0]


def _build_one(trt, builder, logger, onnx_path: Path, manifest: dict, name: str, req, archs: list | None, timing_path: Path) -> bytes:
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="bf-fp16-") as scratch:
        path = _graph_for_builder(onnx_path, engine_precision(manifest, name), Path(scratch))
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
            raise BfError(f"{req.target}: {FLAVORS[req.target].label} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if archs is not None:  # trt-rtx
        config.num_compute_capabilities = len(archs)
        for i, cc in enumerate(archs):
            config.set_compute_capability(cc, i)
    profile = builder.create_optimization_profile()
    for inp, (lo, opt, hi) in profile_shapes(manifest, name).items():
        profile.set_shape(inp, lo, opt, hi)
    config.add_optimization_profile(profile)
    timed = req.target == "trt"  # TensorRT for RTX times nothing ahead of time: it has no timing cache to keep
    if timed:
        cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        for msg in logger.held:
            print(msg, file=sys.stderr)
        raise BfError(f"{FLAVORS[req.target].label} failed to build the {name} engine (see its log above)")
    if timed:
        with atomic_path(timing_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)
