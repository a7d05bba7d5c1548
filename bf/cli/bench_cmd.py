"""bf bench: sizes, latency and memory of an export next to its FP baseline."""

from __future__ import annotations

import os
from pathlib import Path

import click

from bf.cli.cached_exports import baseline_export, bench_target
from bf.cli.checks import check_gpu_backend, check_outputs, parse_batch_sizes
from bf.cli.options import FUSED_OPTION, KEEP_DECODED_OPTION, backend_options
from bf.cli.output import log, progress_bar, write_json


@click.command("bench")
@click.argument("target", type=click.Path(path_type=Path), required=False)
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu). torch: PyTorch on a CUDA GPU, quantized weights decoded "
                   "layer by layer by plugins_trt's kernels. trt: TensorRT engines (a --target trt export).")  # fmt: skip
@click.option("--baseline", type=click.Choice(["fp16", "none"]), default="fp16", show_default=True,
              help="Also run the unquantized base model (torch: FP16 weights; ort: its float32 graphs; trt: its engines) and "
                   "report quantized/baseline ratios.")  # fmt: skip
@click.option("--height", type=int, default=None, help="Image height [default: the export's].")
@click.option("--width", type=int, default=None, help="Image width [default: the export's].")
@click.option("--batch", "batch_text", default="2", show_default=True, help="UNet batch sizes, comma-separated (2: one image with CFG).")
@click.option("--steps", type=int, default=None, help="Sampling steps end to end [default and only choice: the export's table].")
@click.option("--runs", type=click.IntRange(1), default=10, show_default=True, help="Timed runs per stage (the median is reported).")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed runs before them.")
@click.option("--no-end-to-end", is_flag=True, help="Skip the full text-to-image run.")
@click.option("--weights", type=click.Choice(["streamed", "decoded"]), default="streamed", show_default=True,
              help="torch: decode each layer just before it runs into a small reused buffer (streamed), or all once at load.")  # fmt: skip
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True, help="torch, trt: replay the UNet step from a CUDA graph.")
@FUSED_OPTION
@KEEP_DECODED_OPTION
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write every figure as JSON here ('-': stdout).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Draw size and latency bars per component (PNG).")
def command(target, backend, baseline, height, width, batch_text, steps, runs, warmup, no_end_to_end, weights, cuda_graph, fused,
            keep_decoded, json_out, plot) -> None:  # fmt: skip
    """Size, latency per stage and GPU memory of an exported model, next to its FP baseline.

    TARGET: a bf export directory, or a .bfq (exported once into the cache; shipped-1.99bit names
    the shipped one). Without it: the shipped 1.99-bit BitsFusion model. Reports the deployed
    artifact sizes, the median time of the text encoder, one UNet step per --batch and the VAE
    decoder, a full generation over the export's steps and, on the torch backend, peak GPU memory
    while the UNet steps.
    """
    import dataclasses

    from bf.runtime.bench import BenchRequest, environment, format_report, ratios
    from bf.runtime.exported import ExportedModel

    batches = parse_batch_sizes(batch_text)
    check_outputs(json_out=json_out, plot=plot)
    check_gpu_backend(backend)
    model = ExportedModel.open(bench_target(target, backend))
    if steps is not None:
        model.check_sampler(model.manifest.scheduler.name, steps)
    req = BenchRequest(batches=batches, height=height, width=width, runs=runs, warmup=warmup, end_to_end=not no_end_to_end)
    quantized = model.manifest.model.quantized
    if baseline == "fp16" and not quantized:
        log(f"{model.root} is an FP export: it is its own baseline")
        baseline = "none"
    options = backend_options(weights if quantized else "fp", cuda_graph, fused, keep_decoded)
    bar = progress_bar(total=None, desc="bench", bar_format="{desc}: {postfix}")
    result = {"backend": backend, "environment": environment(backend), "settings": {**dataclasses.asdict(req), "baseline": baseline}}
    result["quantized"] = _run(backend, "quantized", model, options, req, bar)
    result["baseline"] = None
    if baseline == "fp16":
        if backend == "torch":
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()  # the peak of the baseline must not see the quantized model's blocks
            result["baseline"] = _run(backend, "baseline", model, dataclasses.replace(options, weights="fp"), req, bar)
        else:
            result["baseline"] = _run(backend, "baseline", ExportedModel.open(baseline_export(model, backend)), options, req, bar)
        result["ratios"] = ratios(result["quantized"], result["baseline"])
    bar.close()
    result["device"] = result["quantized"].get("device") or f"cpu ({os.cpu_count()} cores)"
    click.echo(format_report(result), err=json_out == Path("-"))
    if json_out is not None:
        write_json(json_out, result)
    if plot is not None:
        from bf.plots import plot_bench

        plot_bench(result, plot)
        log(f"wrote {plot}")


def _run(backend: str, label: str, model, options, req, bar) -> dict:
    """One model benchmarked on ``backend``; the runner is released before the next one loads."""
    from bf.runtime.backend_options import open_backend
    from bf.runtime.bench import bench_model

    runner = open_backend(backend, model, options)
    result = bench_model(model, runner, req, progress=lambda what: bar.set_postfix_str(f"{label}: {what}"))
    if backend == "torch":
        result["weights"] = runner.weights
        result["device"] = runner.device_name
        result["fused"], result["fused_layers"] = runner.fused, runner.fused_layers
    del runner
    return result
