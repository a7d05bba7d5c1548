"""bf bench: artifact sizes, per-stage latency, end-to-end time and GPU memory of an exported
model on one backend, side by side with its FP baseline.

Stage latency is the median of ``runs`` timed calls after ``warmup`` untimed ones: CUDA events
on device tensors for backends that offer them (torch), wall clock around the NumPy calls
otherwise (ort, trt: host copies included, as a user of the runtime pays them).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

from bf.runtime.exported import ExportedModel
from bf.runtime.generation import GenerationRequest, generate

STAGES = ("text_encoder", "unet_step", "vae_decoder")


@dataclass(frozen=True)
class BenchRequest:
    batches: tuple[int, ...] = (2,)  # UNet batch: 2 is one image with classifier-free guidance
    height: int | None = None
    width: int | None = None
    runs: int = 10
    warmup: int = 3
    end_to_end: bool = True


def artifact_sizes(model: ExportedModel) -> dict:
    m = model.manifest
    files = {name: sum(f["bytes"] for f in g["files"].values()) for name, g in m.graphs.items()}
    built = {n: e for n, e in (m.engines or {}).items() if isinstance(e, dict) and "file" in e}  # "plugin" is a file name
    engines = {n: (model.root / e["file"]).stat().st_size for n, e in built.items()}
    return {
        "packed_unet_bytes": m.raw.get("packed_unet_bytes") or None,  # codes and scales of the quantized layers (None: FP model)
        "graph_bytes": files,
        "engine_bytes": engines or None,
        "unet_deployed_bytes": engines.get("unet") or files["unet"],
        "unet_deployed_as": "TensorRT engine" if engines.get("unet") else f"ONNX file ({m.raw.get('graph_dtype', 'float32')} graph)",
    }


def stage_inputs(model: ExportedModel, batch: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Inputs of the three stages: one prompt pair, a UNet batch, and the VAE's images (half the UNet batch)."""
    m = model.manifest
    rng = np.random.default_rng(0)
    scale = m.image.latent_scale
    latent = (m.latent_channels, height // scale, width // scale)
    out = {
        "input_ids": np.zeros((2, m.max_tokens), dtype=np.int64),
        "sample": rng.standard_normal((batch, *latent)).astype(np.float32),
        "context": rng.standard_normal((batch, m.max_tokens, m.hidden_size)).astype(np.float32),
        "latent": rng.standard_normal((max(1, batch // 2), *latent)).astype(np.float32),
    }
    if m.family == "sdxl":  # the pooled prompt and the micro-conditioning of a height x width image
        out["text_embeds"] = rng.standard_normal((batch, m.pooled_size)).astype(np.float32)
        out["time_ids"] = np.tile(np.array([[height, width, 0, 0, height, width]], dtype=np.float32), (batch, 1))
    return out


def _host_calls(backend, inputs: dict[str, np.ndarray]) -> dict:
    added = {k: inputs[k] for k in ("text_embeds", "time_ids")} if "text_embeds" in inputs else None
    sdxl = added is not None

    def text():  # SDXL: both text encoders
        backend.text_encoder(inputs["input_ids"])
        if sdxl:
            backend.text_encoder_2(inputs["input_ids"])

    return {
        "text_encoder": text,
        "unet_step": lambda: backend.unet(inputs["sample"], 0, inputs["context"], added),
        "vae_decoder": lambda: backend.vae_decoder(inputs["latent"]),
    }


def _host_time_ms(call, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def _summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": len(times)}


def bench_backend(model: ExportedModel, backend, req: BenchRequest, progress=lambda what: None) -> dict:
    """Stage latencies per batch, end-to-end time and (on GPU) memory of one backend."""
    m = model.manifest
    height, width = model.image_size(req.height, req.width)
    on_device = hasattr(backend, "device_calls")
    timer = backend.time_ms if on_device else _host_time_ms
    out: dict = {"timing": "cuda events" if on_device else "wall clock", "stages": {}}
    peaks = {}
    for batch in req.batches:
        inputs = stage_inputs(model, batch, height, width)
        calls = backend.device_calls(inputs) if on_device else _host_calls(backend, inputs)
        for stage in STAGES:
            if stage != "unet_step" and batch != req.batches[0]:
                continue  # the text encoder runs once per prompt pair, the VAE once per image set: one batch is enough
            progress(f"{stage} (batch {batch})")
            first = {}
            if stage == "unet_step":
                if on_device:
                    backend.reset_peak_memory()
                # the first call pays what happens once per shape (a compile, a CUDA graph capture, kernel choice)
                first["first_call_ms"] = timer(calls[stage], 1, 0)[0]
            times = timer(calls[stage], req.runs, req.warmup)
            if on_device and stage == "unet_step":
                peaks[str(batch)] = backend.peak_memory()
            key = stage if stage != "unet_step" else f"unet_step_batch{batch}"
            out["stages"][key] = _summary(times) | first
    if on_device:
        mem = backend.memory()
        out["memory"] = mem
        out["peak_mem_bytes"] = peaks  # process peak while the UNet steps run, per batch
        out["unet_peak_mem_bytes"] = {b: p - mem["text_vae_bytes"] for b, p in peaks.items()}  # without text encoder and VAE
    if req.end_to_end:
        batch = max(req.batches)
        progress(f"end to end ({m.scheduler.steps} steps)")
        gen_req = GenerationRequest("a photo of a cat", height=height, width=width, num_images=max(1, batch // 2))
        runs = []
        if on_device:  # a whole generation's peak (both runs): text encoders, UNet steps and VAE decode, as the backend holds them
            backend.reset_peak_memory()
        for _ in range(2):  # the faster of two: the first may still pay one-time costs (allocations, kernel choice)
            timings = generate(model, backend, gen_req).timings
            runs.append({"seconds": sum(v for k, v in timings.items() if k.endswith("_s")), **timings})
        out["end_to_end"] = {"images": gen_req.num_images, "steps": m.scheduler.steps, **min(runs, key=lambda r: r["seconds"])}
        if on_device:
            out["end_to_end"]["peak_mem_bytes"] = backend.peak_memory()
    return out


def bench_model(model: ExportedModel, backend, req: BenchRequest, progress=lambda what: None) -> dict:
    """Sizes and run of one model on one backend. A backend that holds the UNet's weights itself
    (torch: from the .bfq, not the graph files) reports those bytes as the deployed UNet."""
    result = {"export": str(model.root), "sizes": artifact_sizes(model), "run": bench_backend(model, backend, req, progress)}
    if "memory" in result["run"]:
        result["sizes"]["unet_deployed_bytes"] = result["run"]["memory"]["unet_weight_bytes"]
        result["sizes"]["unet_deployed_as"] = f"weights resident ({backend.name})"
    return result


def ratios(quant: dict, base: dict) -> dict:
    """Quantized over baseline (under 1: the quantized model is faster or smaller)."""
    r = {}
    for key, q in quant["run"]["stages"].items():
        if key in base["run"]["stages"]:
            r[f"{key}_time"] = q["median_ms"] / base["run"]["stages"][key]["median_ms"]
    if "end_to_end" in quant["run"] and "end_to_end" in base["run"]:
        r["end_to_end_time"] = quant["run"]["end_to_end"]["seconds"] / base["run"]["end_to_end"]["seconds"]
    for b, p in quant["run"].get("unet_peak_mem_bytes", {}).items():
        if b in base["run"].get("unet_peak_mem_bytes", {}):
            r[f"unet_peak_mem_batch{b}"] = p / base["run"]["unet_peak_mem_bytes"][b]
    r["unet_deployed_bytes"] = quant["sizes"]["unet_deployed_bytes"] / base["sizes"]["unet_deployed_bytes"]
    return r


def headline(result: dict) -> dict:
    """The figures a reader compares first, at the largest UNet batch: the quantized step and its UNet
    peak memory against the fastest FP16 configuration measured in the same run (torch backend)."""
    q, b = result["quantized"]["run"], result["baseline"]["run"]
    batch = max(result["settings"]["batches"])
    key = f"unet_step_batch{batch}"
    out = {"batch": batch, "best_fp16_config": result.get("best_fp16_config"), "best_fp16_step_ms": b["stages"][key]["median_ms"],
           "step_ms": q["stages"][key]["median_ms"]}  # fmt: skip
    out["step_vs_best_fp16"] = out["step_ms"] / out["best_fp16_step_ms"]
    if str(batch) in q.get("unet_peak_mem_bytes", {}) and str(batch) in b.get("unet_peak_mem_bytes", {}):
        out["peak_mem_bytes"], out["fp16_peak_mem_bytes"] = q["unet_peak_mem_bytes"][str(batch)], b["unet_peak_mem_bytes"][str(batch)]
        out["peak_mem_vs_best_fp16"] = out["peak_mem_bytes"] / out["fp16_peak_mem_bytes"]
    out["first_call_s"] = {"quantized": q["stages"][key].get("first_call_ms", float("nan")) / 1e3} | {
        f"fp16 {name}": r["run"]["stages"][key].get("first_call_ms", float("nan")) / 1e3
        for name, r in (result.get("fp16_configs") or {}).items()
        if "run" in r
    }
    return out


def environment(backend_name: str) -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor() or None}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt"):
        with contextlib.suppress(md.PackageNotFoundError):
            env[dist] = md.version(dist)
    return env


def format_report(result: dict) -> str:
    rows = []
    q, b = result["quantized"], result.get("baseline")
    head = f"{'':28s}{'quantized':>14s}" + (f"{'baseline':>14s}{'ratio':>8s}" if b else "")
    rows.append(head)

    def line(label: str, qv: float | None, bv: float | None, unit: str, scale: float = 1.0) -> None:
        def fmt(v: float | None) -> str:
            return f"{v / scale:12.3f}{unit}" if v is not None else f"{'-':>14s}"

        text = f"{label:28s}{fmt(qv)}"
        if b:
            text += fmt(bv) + (f"{qv / bv:8.3f}" if qv and bv else f"{'-':>8s}")
        rows.append(text)

    line(f"UNet, {q['sizes']['unet_deployed_as']}", q["sizes"]["unet_deployed_bytes"], b and b["sizes"]["unet_deployed_bytes"], " MB", 1e6)
    if q["sizes"]["packed_unet_bytes"]:
        line("packed UNet layers", q["sizes"]["packed_unet_bytes"], None, " MB", 1e6)
    for key, s in q["run"]["stages"].items():
        label = "text encoders (both)" if key == "text_encoder" and result.get("family") == "sdxl" else key.replace("_", " ")
        line(label, s["median_ms"], b and b["run"]["stages"].get(key, {}).get("median_ms"), " ms")
    if "end_to_end" in q["run"]:
        e = q["run"]["end_to_end"]
        line(f"end to end ({e['steps']} steps)", e["seconds"], b and b["run"].get("end_to_end", {}).get("seconds"), " s ")
    for batch, p in q["run"].get("unet_peak_mem_bytes", {}).items():
        line(f"UNet peak memory (batch {batch})", p, b and b["run"].get("unet_peak_mem_bytes", {}).get(batch), " GB", 1e9)
    if result.get("fp16_configs"):
        batch = max(result["settings"]["batches"])
        rows.append(f"FP16 configurations, UNet step (batch {batch}); the baseline is the fastest:")
        for name, r in result["fp16_configs"].items():
            if "run" not in r:
                rows.append(f"  {name:26s}{'did not run':>15s}")
                continue
            s = r["run"]["stages"][f"unet_step_batch{batch}"]
            mark = "  <- baseline" if name == result.get("best_fp16_config") else ""
            rows.append(f"  {name:26s}{s['median_ms']:12.3f} ms  (first call {s.get('first_call_ms', 0) / 1e3:.1f} s){mark}")
    return "\n".join(rows)
