"""Exports bf makes for itself into its cache (bf.cache): the shipped model for bf infer and bf bench
without a target, a .bfq given to bf bench, and the FP baseline an export is compared with.

Each is keyed by what it was made from (content hash, target, settings, bf version), made once, and
made without the ONNX Runtime check (bf's own models, exported by bf's own exporter).
"""

from __future__ import annotations

from pathlib import Path

import bf
from bf.cli.output import log
from bf.errors import BfError


def cached_export(source: Path, key: str, target: str, **settings) -> Path:
    """``bf export SOURCE`` into the cache once per (source, target, settings)."""
    from bf.cache import cache_root
    from bf.export.exporter import ExportRequest, export_model

    out = cache_root() / "-".join(
        [key, target, *("_".join(v) if isinstance(v, tuple) else str(v) for v in settings.values()), bf.__version__]
    )
    if (out / "manifest.json").is_file():
        return out
    log(f"exporting {source} ({target}) to {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    export_model(source, out, ExportRequest(target=target, check=False, **settings), log=lambda m: None)
    return out


def cached_bfq_export(bfq: Path, target: str, **settings) -> Path:
    """A .bfq exported once into the cache, keyed by its content (a retrained file is exported again)."""
    from bf.export.exporter import sha256_file

    return cached_export(bfq, sha256_file(bfq).removeprefix("sha256:")[:16], target, **settings)


def check_shipped_size(height: int | None, width: int | None) -> None:
    """An image size the shipped model's export would refuse, refused before that export is made (the first time,
    seconds of work)."""
    from bf.models.directory import ModelDir
    from bf.models.shipped import shipped_model_dir
    from bf.native_size import check_size, size_rule

    base = ModelDir(shipped_model_dir())
    multiple, _, native = size_rule(base.config("unet"), base.config("vae"))
    check_size(height or native, width or native, multiple)


def shipped_export(scheduler: str = "pndm", steps: int = 50) -> Path:
    """The shipped 1.99-bit model, exported (onnx-std) into the cache once per sampler and step count."""
    from bf.models.shipped import shipped_bfq

    return cached_bfq_export(shipped_bfq(), "onnx-std", scheduler=scheduler, steps=steps)


def bench_target(target: Path | None, backend: str) -> Path:
    """What bf bench runs: an export directory as given, a .bfq exported into the cache, or the shipped model."""
    from bf.models.shipped import model_source

    if target is None:
        return shipped_export()
    target = model_source(target)
    if target.is_file():
        return cached_bfq_export(target, "trt" if backend == "trt" else "onnx-std")
    return target


def baseline_export(model, backend: str) -> Path:
    """The FP model a quantized export came from, exported with the same sampler and size."""
    from bf.models.base_model import quantized_from
    from bf.models.directory import COMPONENTS

    source = Path(model.manifest.model.source)
    if not source.is_file():
        raise BfError(f"{model.root} was exported from {source}, which is gone; the baseline is its base model (or pass --baseline none)")
    base = quantized_from(source)
    m = model.manifest
    settings = {"scheduler": m.scheduler.name, "steps": m.scheduler.steps, "height": m.image.height, "width": m.image.width}
    key = "fp-" + base.content_hash(COMPONENTS).removeprefix("sha256:")[:16]  # the UNet too: it is what the baseline runs
    target = "onnx-std"
    if backend == "trt":  # the same flavour, precision and target GPUs as the engines it is compared with
        target = m.target if m.target in ("trt", "trt-rtx") else "trt"
        settings["precision"] = m.precision
        if target == "trt-rtx":
            settings["gpu_archs"] = tuple(m.raw.get("export_settings", {}).get("gpu_archs") or ())
    return cached_export(base.root, key, target, **settings)
