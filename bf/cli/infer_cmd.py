"""bf infer: images from an exported model with the lean runtime."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bf.cli.cached_exports import check_shipped_size, shipped_export
from bf.cli.checks import check_gpu_backend, check_png_out, check_torch_options, parse_lora_args
from bf.cli.options import COMPILE_OPTION, FUSED_OPTION, KEEP_DECODED_OPTION, LOW_MEMORY_OPTION, RUNTIME_LORA_OPTION, backend_options
from bf.cli.output import log, progress_bar
from bf.errors import BfError
from bf.scheduler_names import SCHEDULERS


@click.command("infer")
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", required=True, help="What to draw.")
@click.option("--negative-prompt", default="", help="What to steer away from (the unconditional prompt).")
@click.option("--steps", type=int, default=None, help="Sampling steps [default: what the model was exported for].")
@click.option("--cfg", type=click.FloatRange(0), default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=1024, show_default=True,
              help="Seed of the initial noise (NumPy): same image on every backend. Image i of --num-images uses seed + i.")  # fmt: skip
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None,
              help="Sampler [default: the one the model was exported for].")  # fmt: skip
@click.option("--height", type=int, default=None, help="Image height [default: the export's].")
@click.option("--width", type=int, default=None, help="Image width [default: the export's].")
@click.option("--num-images", type=click.IntRange(1, 64), default=1, show_default=True, help="Images per prompt (one batch).")
@click.option(
    "--original-size",
    "original_size",
    metavar="HxW",
    default=None,
    help="SDXL micro-conditioning: the size the model is told the image was originally [default: --height x --width].",
)
@click.option(
    "--crop",
    metavar="TOP,LEFT",
    default="0,0",
    show_default=True,
    help="SDXL micro-conditioning: the crop corner the model is told the image was cut at.",
)
@click.option("--backend", type=click.Choice(["ort", "trt", "torch"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu). trt: the TensorRT engines of a --target trt or trt-rtx export "
                   "(needs bf[trt]). torch: PyTorch on a CUDA GPU, weights decoded by plugins_trt's kernels (needs bf[train] "
                   "and make plugins).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True,
              help="PNG to write (with -1, -2, ... before the suffix for several images).")  # fmt: skip
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="Replay the UNet step from a CUDA graph [default: on for torch, off for trt].")  # fmt: skip
@FUSED_OPTION
@KEEP_DECODED_OPTION
@COMPILE_OPTION
@RUNTIME_LORA_OPTION
@LOW_MEMORY_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the settings, output files and timings per stage as JSON.")
def command(model_dir, prompt, negative_prompt, steps, cfg, seed, scheduler, height, width, num_images, original_size, crop, backend,
            cuda_graph, fused, keep_decoded, compile_step, loras, low_memory, out, as_json) -> None:  # fmt: skip
    """Generate images from an exported model directory (bf export's output) with the lean runtime.

    Without MODEL_DIR: the shipped 1.99-bit BitsFusion model, exported on first use.

    \b
    No torch, diffusers or transformers are imported on the ort backend.
    The PNG carries the prompt, negative prompt, seed, steps, cfg,
    scheduler and model hash in its metadata.
    """
    from bf.runtime.backend_options import open_backend
    from bf.runtime.exported import ExportedModel
    from bf.runtime.generation import GenerationRequest, checked_sampler, generate
    from bf.runtime.png import write_png

    if not prompt.strip():
        raise BfError("--prompt is empty; say what to draw")
    if steps is not None and steps < 1:  # before the shipped model is exported for it
        raise BfError(f"--steps {steps}: must be at least 1")
    check_torch_options(backend, compile_step, fused, low_memory)
    if loras and backend != "torch":
        raise BfError(f"--lora runs on --backend torch; the {backend} backend runs the exported graph: put the LoRA into it "
                      "with bf export --lora")  # fmt: skip
    lora_args = parse_lora_args(loras)
    original = _pair(original_size, "--original-size", "x", "HxW, e.g. 1024x1024") if original_size else None
    crop_at = _pair(crop, "--crop", ",", "TOP,LEFT, e.g. 0,0", minimum=0)
    check_png_out(out)
    check_gpu_backend(backend)
    options = backend_options(None, cuda_graph, fused, keep_decoded, compile_step, lora_args, low_memory)
    if model_dir is None:
        check_shipped_size(height, width)
    model = ExportedModel.open(model_dir if model_dir is not None else shipped_export(scheduler or "pndm", 50 if steps is None else steps))
    req = GenerationRequest(prompt, negative_prompt, steps, cfg, seed, scheduler, height, width, num_images, original, crop_at)
    checked_sampler(model, req)  # what the request asks of this export, refused before any backend loads
    if warning := model.size_warning(height, width):
        log(warning)
    runner = open_backend(backend, model, options, log=log)
    # PNDM makes one UNet call more than its steps (51 for 50): the bar counts calls, not steps. Its clock starts once
    # the backend is loaded (a UNet built or compiled at its first step still counts towards that step).
    bar = progress_bar(total=None, desc="sampling", unit="UNet call")

    def progress(i: int, n: int) -> None:
        bar.total = n
        bar.update(1)

    result = generate(model, runner, req, progress)
    bar.close()
    if result.dropped_tokens:
        log(f"warning: the prompt is longer than 75 tokens; the last {result.dropped_tokens} were dropped")
    paths = [out] if num_images == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(num_images)]
    lora = getattr(runner, "lora_applied", [])
    for i, (path, image) in enumerate(zip(paths, result.images, strict=True)):
        settings = {**result.settings, "seed": seed + i, **({"loras": lora} if lora else {})}  # what reproduces this image alone
        write_png(path, image, {"bf": json.dumps(settings), **{k: str(v) for k, v in settings.items()}})
    log(f"wrote {', '.join(map(str, paths))}")
    if as_json:
        execution = {"backend": runner.name, "provider": getattr(runner, "provider", None)}  # ort: the execution provider it took
        click.echo(json.dumps({"files": [str(p) for p in paths], "settings": {**result.settings, **({"loras": lora} if lora else {})},
                               "execution": execution,
                               "timings": result.timings}, indent=1))  # fmt: skip


def _pair(text: str, option: str, sep: str, form: str, minimum: int = 1) -> tuple[int, int]:
    parts = text.lower().split(sep)
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise BfError(f"{option} {text}: expected {form}") from None
    if a < minimum or b < minimum:
        raise BfError(f"{option} {text}: both must be at least {minimum}")
    return a, b
