"""bf to-diffusers: a .bfq as a diffusers model directory that loads with from_pretrained after import bf.diffusers."""

from __future__ import annotations

from pathlib import Path

import click

from bf.cli.checks import check_new_model_dir
from bf.cli.output import log


@click.command("to-diffusers")
@click.argument("checkpoint", default="shipped-1.99bit")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The model directory to write (new, or empty).")
@click.option("--base-model", type=click.Path(path_type=Path), help="Base model directory for a .bfq that was quantized without --bundle.")
@click.option("--keep-decoded", is_flag=True, help="Recorded in the config: each layer decodes its weight once and keeps it.")
def command(checkpoint, out, base_model, keep_decoded) -> None:
    """Write CHECKPOINT (a .bfq; default: the shipped 1.99-bit model) as a diffusers model directory.

    \b
    The UNet keeps the packed codes and float32 scales (no dequantized copy); the text
    encoder, tokenizer, VAE and scheduler come from the .bfq's bundle or its base model.
    Then, in Python (one dtype for every component: the bundle's text encoder and
    VAE are stored in float16):
      import torch, bf.diffusers  # registers the 'bitsfusion' quantization backend
      from diffusers import DiffusionPipeline
      pipe = DiffusionPipeline.from_pretrained(OUT, dtype=torch.float32)  # float16 on a GPU
    Each quantized layer decodes its weight when it runs (CUDA kernels on a GPU, the
    format's rule on the CPU); save_pretrained writes the same layout back.
    """
    from bf.diffusers.directory import write_diffusers_model
    from bf.format import Checkpoint
    from bf.models.base_model import resolve_base_model
    from bf.models.shipped import model_source

    source = model_source(checkpoint)
    check_new_model_dir(out)
    ckpt = Checkpoint.load(source)
    base = resolve_base_model(ckpt, source, base_model, log)
    write_diffusers_model(ckpt, base, out, keep_decoded)
    log(f"wrote {out}: {len(ckpt.layers)} quantized UNet layers as packed codes; load it with 'import bf.diffusers' and "
        f"DiffusionPipeline.from_pretrained('{out}', dtype=torch.float32)")  # fmt: skip
