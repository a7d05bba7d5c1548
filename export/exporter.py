"""``bf export``: a .bfq in, a directory of graphs, tokenizer, scheduler and manifest out.

Everything is written into a temporary sibling directory and renamed into place only after
the check passed, so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx
import torch

from bf.atomic import atomic_dir
from bf.errors import BfError
from bf.export.check import GraphCheck, check_graph, raise_on_failures
from bf.export.components import MAX_TOKENS, build_components, example_inputs
from bf.export.lowering import count_dequant_nodes, dequant_inputs, lower_graph
from bf.export.onnx_graphs import graph_specs, save_graph, store_exact_fp16, trace_to_onnx
from bf.export.qdq_lowering import lower_graph_qdq, qdq_nodes
from bf.export.sizes import unet_breakdown
from bf.format import Checkpoint
from bf.format.dequant_op import DOMAIN, OP_TYPE, OP_VERSION, PLUGIN_NAMESPACE
from bf.format.export_manifest import ENGINE_TARGETS, EXPORT_FORMAT, EXPORT_VERSION, TARGETS, manifest_json
from bf.native_size import far_from_native, nearest_multiple, size_rule

# what each graph form makes of a quantized weight, for the export's log
FORM_WORDS = {
    "custom": "LowBitDequant ops",
    "std": "decoded in standard integer operators",
    "qdq": "DequantizeLinear; 8-bit balanced: stored dequantized",
}

MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16")
WEIGHTS = ("plugin", "qdq")  # how an engine target's graphs carry the quantized weights
# The graph form each target writes: custom LowBitDequant ops, standard decode ops, or DequantizeLinear.
GRAPH_FORMS = {"onnx": "custom", "onnx-std": "std", "onnx-qdq": "qdq"}


@dataclass(frozen=True)
class ExportRequest:
    target: str = "onnx"
    scheduler: str | None = None  # None: the model's own
    steps: int = 50
    height: int | None = None  # None: the model's native size
    width: int | None = None
    batch: int = 2  # largest batch the engines are built for (2: one prompt with classifier-free guidance)
    precision: str = "fp32"  # of the TensorRT engines; the ONNX graphs are float32 (see validate)
    check: bool = True
    plugin: Path | None = None  # TensorRT plugin library (--weights plugin)
    weights: str | None = None  # engine targets: plugin or qdq (default: DEFAULT_WEIGHTS)
    gpu_archs: tuple[str, ...] = ()  # trt-rtx: compute capabilities to build for, as "86"
    loras: tuple[tuple[str, float], ...] = ()  # LoRA files and their scales: branches beside the UNet's layers

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise BfError(f"--target {self.target}: expected one of {', '.join(TARGETS)}")
        if self.weights is not None and self.target not in ENGINE_TARGETS:
            raise BfError(
                f"--weights applies to the engine targets ({', '.join(ENGINE_TARGETS)}); --target {self.target} fixes the graph form"
            )
        if self.weights is not None and self.weights not in WEIGHTS:
            raise BfError(f"--weights {self.weights}: expected one of {', '.join(WEIGHTS)}")
        if self.gpu_archs and self.target != "trt-rtx":
            raise BfError("--gpu-arch applies to --target trt-rtx (--target trt builds for the GPU it runs on)")
        for name, v in (("--height", self.height), ("--width", self.width)):  # the multiple: from the model's configs
            if v is not None and v < 8:
                raise BfError(f"{name} {v}: image sizes must be at least 8")
        if self.precision not in PRECISIONS:
            raise BfError(f"precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.target not in ENGINE_TARGETS:
            # Tracing a float16 model on the CPU leaves float32 islands (attention) in the graph that ONNX
            # Runtime rejects; the engine targets build fp16 engines from a float16 copy of the checked float32 graphs.
            raise BfError("--fp16 applies to TensorRT engines only (--target trt or trt-rtx); ONNX graphs are exported in float32")
        if self.steps < 1 or self.batch < 1:
            raise BfError("--steps and --batch must be at least 1")


# qdq needs nothing but TensorRT; plugin engines are half the size but need libbf_trt_plugin.so built
# against TensorRT's headers, which no package installs.
DEFAULT_WEIGHTS = "qdq"


def graph_form(req: ExportRequest) -> str:
    if req.target in ENGINE_TARGETS:
        return "custom" if (req.weights or DEFAULT_WEIGHTS) == "plugin" else "qdq"
    return GRAPH_FORMS[req.target]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _io(values) -> list[dict]:
    """Name, NumPy dtype and shape (dimension names for dynamic axes) of graph inputs or outputs."""
    out = []
    for vi in values:
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append({"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
    return out


def _preflight(req: ExportRequest, then: Callable[[], None]) -> Callable:
    """What load_model calls before the weights load (for SDXL that is a minute), with the base model and the UNet's
    config: the image size and the sampler the request asks for, checked from the configs (the same refusals as
    after loading); ``then`` when they pass."""
    from bf.models.time_cache import sampler_timesteps
    from bf.scheduler_names import native_scheduler

    def check(base, unet_config: dict) -> None:
        multiple, levels, native = size_rule(unet_config, base.config("vae"))
        for name, v in (("--height", req.height or native), ("--width", req.width or native)):
            if v % multiple:
                raise BfError(f"{name} {v}: this UNet halves its latents {levels}x, so image sizes must be multiples of "
                              f"{multiple} (nearest: {nearest_multiple(v, multiple)})")  # fmt: skip
        config = base.config("scheduler")
        sampler_timesteps(req.scheduler or native_scheduler(config), config, req.steps)
        then()

    return check


def export_model(
    source: Path,
    out: Path,
    req: ExportRequest,
    base_model: Path | None = None,
    log: Callable[[str], None] = lambda m: None,
    progress: Callable[[str], None] = lambda stage: None,
) -> dict:
    """Export ``source`` (a .bfq, or an FP model directory as the reference) into ``out``; returns the manifest."""
    from bf.models.diffusers_pipeline import load_model

    req.validate()
    if out.exists() and any(out.iterdir()):
        raise BfError(f"{out} exists and is not empty; choose another --out or remove it")
    if req.target in ENGINE_TARGETS:  # before minutes of tracing: what the engines need must be there
        from bf.export.tensorrt_engines import prepare
        from bf.tensorrt_flavors import DEFAULT_RTX_ARCHS

        req = replace(req, weights=req.weights or DEFAULT_WEIGHTS,
                      gpu_archs=req.gpu_archs or (DEFAULT_RTX_ARCHS if req.target == "trt-rtx" else ()))  # fmt: skip
        engine_gpus = prepare(req)
    form = graph_form(req)
    if req.loras:  # every file read and checked before the model loads
        from bf.lora_adapters import read_lora

        lora_files = {Path(f): read_lora(Path(f)) for f, _ in req.loras}
    ckpt = None
    if Path(source).is_dir():  # the FP model itself, exported the same way: the reference for the runtime
        from bf.models.directory import ModelDir

        layers, identity = {}, {"source": str(Path(source).resolve()), "sha256": ModelDir.open(source).content_hash(), "quantized": False}
        loading = f"loading {source} (FP model, no quantized layers)"
    else:
        ckpt = Checkpoint.load(source)
        layers = ckpt.layers
        identity = {"source": str(Path(source).resolve()), "sha256": sha256_file(source), "quantized": True,
                    "base_model_hash": ckpt.base_model.get("hash")}  # fmt: skip
        loading = f"loading {source} ({len(layers)} quantized layers)"
    loaded = load_model(source, scheduler=req.scheduler, base_model=base_model, log=log, checkpoint=ckpt,  # the .bfq read once
                        before_weights=_preflight(req, lambda: log(loading)))  # fmt: skip
    pipe = loaded.pipe
    _, _, native = size_rule(pipe.unet.config, pipe.vae.config)  # the size and sampler were checked before the weights loaded
    req = replace(req, height=req.height or native, width=req.width or native, scheduler=loaded.scheduler)
    if warning := far_from_native(req.height, req.width, native):
        log(warning)
    comps = build_components(pipe, layers, req.scheduler, req.steps)
    lora_applied: list[dict] = []
    if req.loras:
        from bf.lora_adapters import apply_loras

        lora_applied = apply_loras(comps.unet.unet, [(Path(f), scale) for f, scale in req.loras], lora_files)
        for lora in lora_applied:
            log(f"LoRA {lora['file']} at scale {lora['scale']:g}: a branch beside {lora['layers']} layers")
    log(f"time-feature table: {req.scheduler}, {req.steps} steps, {len(comps.timesteps)} UNet calls")
    check_batch = min(req.batch, 2)
    inputs = example_inputs(comps, check_batch, req.height, req.width)
    with atomic_dir(out) as tmp:  # an empty out is replaced; nothing of a failed or killed export stays
        graphs, checks = {}, []
        for spec in graph_specs(comps.family):
            progress(f"tracing {spec.name}")
            module = getattr(comps, spec.name)
            args = tuple(torch.from_numpy(inputs[spec.name][k]) for k in spec.inputs)
            t0 = time.time()
            model = trace_to_onnx(module, args, spec)
            store_exact_fp16(model, keep=dequant_inputs(model)[1])
            custom = count_dequant_nodes(model)

            def lowered(as_form: str, model=model, custom=custom) -> onnx.ModelProto:
                if not custom or as_form == "custom":
                    return model
                return lower_graph(model) if as_form == "std" else lower_graph_qdq(model)

            deployed = lowered(form)
            files = save_graph(deployed, tmp / spec.file)
            onnx.checker.check_model(str(files[0]) if len(files) > 1 else deployed)  # past 2 GiB only a file can be checked
            size_mb = sum(f.stat().st_size for f in files) / 1e6
            log(f"{spec.file}: {custom} quantized weights ({FORM_WORDS[form]}), {size_mb:.2f} MB ({time.time() - t0:.1f}s)")
            if req.check:
                progress(f"checking {spec.name}")
                with torch.no_grad():
                    ref = module(*args)
                ref = [r.numpy() for r in ref] if isinstance(ref, tuple) else ref.numpy()
                # The custom-op graph is checked through its standard lowering (same decode, no op library needed).
                checked = lowered("std") if form == "custom" else deployed
                if checked is deployed and len(files) > 1:  # past 2 GiB ONNX Runtime reads it from the file
                    checked = str(files[0])
                checks.append(check_graph(spec.name, checked, inputs[spec.name], ref, "float32"))
            graphs[spec.name] = {
                "file": spec.file,
                "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files},
                "inputs": _io(deployed.graph.input),
                "outputs": _io(deployed.graph.output),
                "dequant_ops": custom if form == "custom" else 0,
                "qdq_weights": qdq_nodes(deployed) if form == "qdq" else 0,
                "opset": next(o.version for o in deployed.opset_import if o.domain in ("", "ai.onnx")),
            }
            if spec.name == "unet":
                graphs[spec.name]["size_breakdown"] = unet_breakdown(deployed, sum(f.stat().st_size for f in files))
        if checks:
            for c in checks:
                log(f"check {c.graph}: {c.psnr_db:.1f} dB PSNR against PyTorch (floor {c.floor_db:.0f} dB)")
            raise_on_failures(checks)
        pipe.tokenizer.save_pretrained(tmp / "tokenizer")
        if comps.family == "sdxl":
            pipe.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
        pipe.scheduler.save_config(tmp / "scheduler")
        manifest = _manifest(identity, layers, req, form, comps, graphs, checks, native, pipe)
        manifest["loras"] = lora_applied  # each file (absolute), its SHA-256, scale and layers: in the UNet graph
        if req.target in ENGINE_TARGETS:
            from bf.export.tensorrt_engines import build_engines

            progress("building engines")
            manifest["engines"] = build_engines(tmp, manifest, req, engine_gpus, log)
        (tmp / MANIFEST).write_text(manifest_json(manifest))  # refused here if a reader would refuse it
    return manifest


def _manifest(
    identity: dict, layers: dict, req: ExportRequest, form: str, comps, graphs: dict, checks: list[GraphCheck], native: int, pipe
) -> dict:
    from bf import __version__

    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "bf_version": __version__,
        "target": req.target,
        "precision": req.precision,  # of the engines
        "graph_dtype": "float32",
        "graph_form": form,  # custom: LowBitDequant ops; std: standard decode ops; qdq: DequantizeLinear over INT4/INT8
        "opset": graphs["unet"]["opset"],
        "op": {"domain": DOMAIN, "op_type": OP_TYPE, "version": OP_VERSION},
        "plugin": {"name": OP_TYPE, "version": str(OP_VERSION), "namespace": PLUGIN_NAMESPACE} if form == "custom" else None,
        "model": identity,
        "scheduler": {"name": req.scheduler, "steps": req.steps, "timesteps": comps.timesteps},
        "image": {
            "height": req.height,
            "width": req.width,
            "max_batch": req.batch,
            "latent_scale": comps.latent_scale,
            "native": native,
            "size_multiple": comps.size_multiple,
        },
        "family": comps.family,
        "latent_channels": comps.latent_channels,
        "hidden_size": comps.hidden_size,
        "pooled_size": comps.pooled_size,  # SDXL: text_embeds' width (0: none)
        "force_zeros_for_empty_prompt": bool(getattr(pipe, "config", {}).get("force_zeros_for_empty_prompt", False)),
        "vae_upcast": bool(pipe.vae.config.get("force_upcast", False)),  # its fp16 overflows: engines keep it fp32
        "max_tokens": MAX_TOKENS,
        "graphs": graphs,
        "check": [c.to_json() for c in checks] if checks else None,
        "export_settings": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(req).items()},
        "packed_unet_bytes": sum(ly.stored_bytes for ly in layers.values()),
    }
