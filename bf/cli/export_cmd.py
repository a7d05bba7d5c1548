"""bf export: ONNX graphs and engines from a .bfq or an FP model directory."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bf.cli.checks import check_output_dir, parse_lora_args
from bf.cli.output import log, progress_bar
from bf.scheduler_names import NATIVE_HELP, SCHEDULERS


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["onnx", "onnx-std", "onnx-qdq", "trt", "trt-rtx"]), default="onnx", show_default=True,
              help="onnx: custom dequant ops over the packed codes (TensorRT plugin, ONNX Runtime op library); onnx-std: "
                   "standard decode operators (any ONNX runtime but TensorRT); onnx-qdq: DequantizeLinear over INT4/INT8 "
                   "constants (any ONNX runtime, TensorRT); trt: graphs plus TensorRT engines for this machine's GPU; "
                   "trt-rtx: graphs plus TensorRT for RTX engines, built on any machine for --gpu-arch.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory (must not exist or be empty).")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None,
              help=f"Sampler the UNet's time-feature table is built for. {NATIVE_HELP}")  # fmt: skip
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True, help="Sampling steps the table is built for.")
@click.option("--height", type=click.IntRange(8), default=None, help="Image height [default: the model's native size].")
@click.option("--width", type=click.IntRange(8), default=None, help="Image width [default: the model's native size].")
@click.option("--batch", type=click.IntRange(1), default=2, show_default=True, help="Largest batch of the TensorRT profiles.")
@click.option("--fp16/--fp32", "fp16", default=None,
              help="Engine precision [default: fp16 for trt and trt-rtx]; the ONNX graphs are float32.")  # fmt: skip
@click.option("--weights", type=click.Choice(["plugin", "qdq"]), default=None,
              help="trt, trt-rtx: how the engines hold the quantized weights. plugin: packed codes decoded by the "
                   "LowBitDequant plugin (about half the UNet engine at SD-v1.5 size; needs the plugin built, see "
                   "plugins_trt/README.md); qdq: INT4/INT8 constants, no plugin.  [default: qdq]")  # fmt: skip
@click.option("--gpu-arch", "gpu_arch", default=None, metavar="CC[,CC...]",
              help="trt-rtx: compute capabilities to build for, e.g. 86,89,120 (RTX 30/40/50 series) [default: 86,89,120].")  # fmt: skip
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the graphs in ONNX Runtime against PyTorch; under 40 dB PSNR the export fails.")  # fmt: skip
@click.option("--base-model", type=click.Path(path_type=Path), default=None, help="Base model directory, if it moved.")
@click.option("--plugin", type=click.Path(path_type=Path), default=None, help="TensorRT plugin library (--weights plugin).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A LoRA (diffusers, peft or kohya format) as a branch beside its UNet layers, in standard MatMul/Conv nodes; "
                   "repeatable; SCALE defaults to 1.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def command(checkpoint, target, out, scheduler, steps, height, width, batch, fp16, weights, gpu_arch, check, base_model, plugin,
            loras, as_json) -> None:  # fmt: skip
    """Export a .bfq as ONNX graphs (text encoder, quantized UNet, VAE decoder), and engines.

    CHECKPOINT may also be an FP model directory: the same graphs without quantization, the
    reference to compare a quantized export with (bf infer runs both). The words shipped-1.99bit
    and shipped name the shipped BitsFusion model and the shipped FP model.

    \b
    Writes text_encoder.onnx, unet.onnx, vae_decoder.onnx, tokenizer/, scheduler/ and
    manifest.json (plus engines/ for trt and trt-rtx; SDXL: also text_encoder_2.onnx and
    tokenizer_2/). Every quantized weight of unet.onnx is one bitsfusion::LowBitDequant node
    over its packed codes (onnx-std: the same decode in standard operators; onnx-qdq:
    DequantizeLinear), and the UNet takes a step index into a time-feature table built for
    --scheduler and --steps (SDXL: and the pooled prompt and micro-conditioning).
    """
    from bf.export.exporter import ExportRequest, export_model
    from bf.export.onnx_graphs import graph_specs
    from bf.models.base_model import source_family
    from bf.models.shipped import model_source
    from bf.tensorrt_flavors import arch_name

    checkpoint = model_source(checkpoint)
    check_output_dir(out)
    lora_args = parse_lora_args(loras)
    engines = target in ("trt", "trt-rtx")
    precision = ("fp16" if engines else "fp32") if fp16 is None else ("fp16" if fp16 else "fp32")
    archs = tuple(arch_name(a) for a in gpu_arch.split(",")) if gpu_arch else ()
    req = ExportRequest(target=target, scheduler=scheduler, steps=steps, height=height, width=width, batch=batch,
                        precision=precision, check=check, plugin=plugin, weights=weights, gpu_archs=archs,
                        loras=tuple((str(path.resolve()), scale) for path, scale in lora_args))  # fmt: skip
    stages = len(graph_specs(source_family(checkpoint))) * (2 if check else 1) + engines  # trace each graph, check each, build the engines
    bar = progress_bar(total=stages, desc="export", bar_format="{desc}: {n}/{total} {postfix}")

    def progress(stage: str) -> None:
        bar.set_postfix_str(stage)
        bar.update(1)

    manifest = export_model(checkpoint, out, req, base_model=base_model, log=log, progress=progress)
    bar.close()
    br = manifest["graphs"]["unet"]["size_breakdown"]
    log(f"wrote {out} ({target}, {precision})")
    log("unet.onnx: " + ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.3f} MB" for k, v in br.items()))
    log(f"packed UNet layers in the .bfq: {manifest['packed_unet_bytes'] / 1e6:.3f} MB")
    if as_json:
        click.echo(json.dumps(manifest, indent=1))
