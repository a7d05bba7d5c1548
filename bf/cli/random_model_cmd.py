"""bf random-model: a randomly initialised model in diffusers layout."""

from __future__ import annotations

from pathlib import Path

import click

from bf.cli.output import log
from bf.errors import BfError


@click.command("random-model")
@click.option(
    "--arch",
    type=click.Choice(["sd15", "sd15-tiny", "sdxl", "sdxl-tiny"]),
    default="sd15-tiny",
    show_default=True,
    help="sd15: SD-v1.5's exact architecture (859.52M UNet parameters); sdxl: SDXL base 1.0's (2567.46M UNet parameters, "
    "two text encoders); -tiny: the same block types at tiny width, for tests.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Precision the weights are saved in.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to create (diffusers layout).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def command(arch: str, seed: int, dtype: str, out: Path, force: bool) -> None:
    """Write a randomly initialised text-to-image model in diffusers layout.

    For size and speed work without pretrained weights, and for tests. The directory
    has unet/, text_encoder/, tokenizer/ (the real CLIP vocabulary), vae/, scheduler/
    and model_index.json, and loads with diffusers' DiffusionPipeline.from_pretrained:
    SD-v1.5 with PNDM (its settings); SDXL with Euler (SDXL base's settings) and also
    text_encoder_2/ and tokenizer_2/. The full SDXL takes about 14 GB on disk in fp32
    (--dtype fp16: about 7 GB).
    """
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model

    if out.exists() and not force:
        raise BfError(f"{out} already exists; pass --force to replace it")
    write_random_model(ARCHITECTURES[arch], out, seed, dtype, overwrite=force, log=log)
    log(f"wrote {arch} model to {out}")
