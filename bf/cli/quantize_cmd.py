"""bf quantize: post-training quantization into a .bfq."""

from __future__ import annotations

from pathlib import Path

import click

from bf.cli.checks import check_new_file
from bf.cli.output import layer_progress, log


@click.command("quantize")
@click.option(
    "--model",
    "model_dir",
    default=None,
    help="Local diffusers Stable Diffusion directory (model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/). "
    "Default: the shipped model.",
)
@click.option("--bits", type=click.IntRange(1, 8), help="Quantize every layer to this width (conv_in/conv_out: 8 bits).")
@click.option("--recipe", type=click.Path(path_type=Path), help="Per-layer bit widths (JSON keyed by module name).")
@click.option(
    "--grid",
    type=click.Choice(["balanced", "plain"]),
    default=None,
    help="balanced: 2^b+1 symmetric levels (BitsFusion); plain: 2^b levels (LSQ baseline). Default: balanced.",
)
@click.option(
    "--init",
    type=click.Choice(["alt", "minmax"]),
    default="alt",
    show_default=True,
    help="Scale init: alternating optimisation of ||s*q - w||, or min-max.",
)
@click.option("--iters", type=click.IntRange(0, 1000), default=10, show_default=True, help="Iterations of the alternating init.")
@click.option(
    "--bundle", is_flag=True, help="Also embed text encoder and VAE (fp16), tokenizer and scheduler: one file is enough to export."
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .bfq file to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def command(
    model_dir: str | None, bits: int | None, recipe: Path | None, grid: str | None, init: str, iters: int, bundle: bool, out: Path,
    force: bool,
) -> None:  # fmt: skip
    """Post-training quantization of the UNet into a packed .bfq checkpoint.

    Every conv/linear weight except the time-embedding layers is quantized per
    output channel; the time layers, biases and norms are kept. No training: the
    checkpoint is the starting point of 'bf train' and a baseline.
    """
    from bf.format import summarize
    from bf.models.directory import ModelDir
    from bf.models.shipped import model_source
    from bf.trainer.ptq import PTQConfig
    from bf.trainer.quantize_model import QuantizeRequest, quantize_model

    check_new_file(out, force)
    model = ModelDir.open(model_source(model_dir))
    req = QuantizeRequest(bits=bits, recipe=recipe, grid=grid, ptq=PTQConfig(init=init, iters=iters), bundle=bundle)
    ckpt = quantize_model(model, req, progress=layer_progress("quantize"), log=log)
    ckpt.save(out)
    s = summarize(ckpt, out.stat().st_size)
    log(
        f"wrote {out}: {s['quantized_layers']} layers, {s['avg_bits']:.3f} avg bits (paper's count), "
        f"{s['stored_bits_per_weight']:.3f} stored bits/weight, UNet {s['unet_bytes'] / 1e6:.2f} MB "
        f"({s['ratio_vs_fp16']:.2f}x smaller than FP16)"
    )
