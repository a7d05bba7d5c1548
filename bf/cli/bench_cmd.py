"""bf bench: sizes, latency and memory of an export next to its FP baseline."""

from __future__ import annotations

import os
from pathlib import Path

import click

from bf.cli.cached_exports import baseline_export, bench_target
from bf.cli.checks import check_gpu_backend, check_outputs, check_torch_options, parse_batch_sizes
from bf.cli.options import COMPILE_OPTION, FUSED_OPTION, KEEP_DECODED_OPTION, LOW_MEMORY_OPTION, backend_options
from bf.cli.output import log, progress_bar, write_json
from bf.errors import BfError

# The FP16 configurations of the torch backend, each a change to the backend's defaults (channels-last, CUDA graph).
FP16_CONFIGS = {"eager": {"cuda_graph": False}, "graph": {}, "graph-nchw": {"channels_last": False}, "compile": {"compile": True}}


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
@COMPILE_OPTION
@LOW_MEMORY_OPTION
@click.option("--fp16-configs", "fp16_text", default=",".join(FP16_CONFIGS), show_default=True,
              help="torch: the FP16 configurations run as baselines (eager, graph: CUDA graph channels-last, graph-nchw, compile: "
                   "torch.compile + CUDA graph); ratios are against the one with the fastest UNet step.")  # fmt: skip
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write every figure as JSON here ('-': stdout).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Draw size and latency bars per component (PNG).")
def command(target, backend, baseline, height, width, batch_text, steps, runs, warmup, no_end_to_end, weights, cuda_graph, fused,
            keep_decoded, compile_step, low_memory, fp16_text, json_out, plot) -> None:  # fmt: skip
    """Size, latency per stage and GPU memory of an exported model, next to its FP baseline.

    TARGET: a bf export directory, or a .bfq (exported once into the cache; shipped-1.99bit names
    the shipped one). Without it: the shipped 1.99-bit BitsFusion model. Reports the deployed
    artifact sizes, the median time of the text encoder, one UNet step per --batch and the VAE
    decoder, a full generation over the export's steps and, on the torch backend, peak GPU memory
    while the UNet steps. On the torch backend the baseline is the fastest of several FP16
    configurations measured in the same run (--fp16-configs), named in the report and the JSON.
    """
    import dataclasses

    from bf.runtime.backend_options import BackendOptions
    from bf.runtime.bench import BenchRequest, environment, format_report, headline, ratios
    from bf.runtime.exported import ExportedModel

    batches = parse_batch_sizes(batch_text)
    fp16_configs = [c.strip() for c in fp16_text.split(",") if c.strip()]
    if unknown := [c for c in fp16_configs if c not in FP16_CONFIGS]:
        raise BfError(f"--fp16-configs {unknown[0]!r}: choose from {', '.join(FP16_CONFIGS)}")
    if backend == "torch" and baseline == "fp16" and not fp16_configs:
        raise BfError("--fp16-configs is empty; name at least one, or pass --baseline none")
    check_torch_options(backend, compile_step, fused, low_memory)
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
    options = backend_options(weights if quantized else "fp", cuda_graph, fused, keep_decoded, compile_step, low_memory=low_memory)
    bar = progress_bar(total=None, desc="bench", bar_format="{desc}: {postfix}")
    result = {
        "backend": backend,
        "environment": environment(backend),
        "settings": {**dataclasses.asdict(req), "baseline": baseline, "low_memory": low_memory},
    }
    result["quantized"] = _run(backend, "quantized", model, options, req, bar)
    result["baseline"] = None
    if baseline == "fp16":
        if backend == "torch":
            import gc

            import torch

            result["fp16_configs"] = {}
            for name in fp16_configs:
                gc.collect()
                torch.cuda.empty_cache()  # the peak of a baseline must not see the previous model's blocks
                fp16 = BackendOptions(weights="fp", low_memory=low_memory, **FP16_CONFIGS[name])  # the same memory settings
                try:
                    result["fp16_configs"][name] = _run(backend, f"FP16 {name}", model, fp16, req, bar)
                except BfError as e:  # a configuration this machine cannot run (no compiler toolchain) is reported, not fatal
                    log(f"warning: FP16 {name} did not run: {e}")
                    result["fp16_configs"][name] = {"error": str(e)}
            ran = [n for n, r in result["fp16_configs"].items() if "error" not in r]
            if not ran:
                raise BfError("no FP16 configuration ran; see the warnings above, or pass --baseline none")
            step = f"unet_step_batch{max(batches)}"
            best = min(ran, key=lambda n: result["fp16_configs"][n]["run"]["stages"][step]["median_ms"])
            result["best_fp16_config"], result["baseline"] = best, result["fp16_configs"][best]
        else:
            result["baseline"] = _run(backend, "baseline", ExportedModel.open(baseline_export(model, backend)), options, req, bar)
        result["ratios"] = ratios(result["quantized"], result["baseline"])
        if backend == "torch":
            result["headline"] = headline(result)
    bar.close()
    result["device"] = result["quantized"].get("device") or f"cpu ({os.cpu_count()} cores)"
    result["family"] = model.manifest.family
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

    runner = open_backend(backend, model, options, log=log)
    result = bench_model(model, runner, req, progress=lambda what: bar.set_postfix_str(f"{label}: {what}"))
    if backend == "torch":
        result["weights"] = runner.weights
        result["device"] = runner.device_name
        result["fused"], result["fused_layers"] = runner.fused, runner.fused_layers
        result["compiled"], result["channels_last"], result["cuda_graph"] = runner.compiled, runner.channels_last, runner.cuda_graph
    del runner
    if backend == "torch":  # every configuration compiles the same step function: none may inherit another's compiled state
        import gc

        import torch._dynamo

        gc.collect()
        torch._dynamo.reset()
    return result
