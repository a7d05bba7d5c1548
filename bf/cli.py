"""The ``bf`` command line: the only place where stages are wired together."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import bf
from bf.errors import BfError


class _Group(click.Group):
    """Turns BfError (and a missing optional dependency) into one line on stderr."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BfError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in _EXTRAS:
                click.echo(f"error: this command needs {e.name}: pip install 'bf[{_EXTRAS[e.name.split('.')[0]]}]'", err=True)
                sys.exit(1)
            raise
        except OSError as e:  # disk full, permission denied, a directory where a file goes
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


_EXTRAS = {"torch": "train", "diffusers": "train", "transformers": "train"}


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="layer", disable=None, file=sys.stderr)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(bf.__version__, prog_name="bf")
def main() -> None:
    """bf: BitsFusion toolchain. Quantize a Stable Diffusion UNet to ~2 bits per weight.

    \b
    Typical flow:
      bf random-model --arch sd15-tiny --out tiny        # a model, no download needed
      bf quantize --model tiny --bits 2 --out tiny.bfq   # post-training quantization
      bf inspect tiny.bfq                                # sizes and bits per layer
    """


@main.command("random-model")
@click.option(
    "--arch",
    type=click.Choice(["sd15", "sd15-tiny"]),
    default="sd15-tiny",
    show_default=True,
    help="sd15: SD-v1.5's exact architecture (859.52M UNet parameters); sd15-tiny: same block types, tiny width.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Precision the weights are saved in.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to create (diffusers layout).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def random_model(arch: str, seed: int, dtype: str, out: Path, force: bool) -> None:
    """Write a randomly initialised text-to-image model in diffusers layout.

    For size and speed work without pretrained weights, and for tests. The directory
    has unet/, text_encoder/, tokenizer/ (the real CLIP vocabulary), vae/, scheduler/
    (PNDM, SD-v1.5 settings) and model_index.json, and loads with diffusers'
    StableDiffusionPipeline.from_pretrained.
    """
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model

    if out.exists() and not force:
        raise BfError(f"{out} already exists; pass --force to replace it")
    write_random_model(ARCHITECTURES[arch], out, seed, dtype, overwrite=force, log=_log)
    _log(f"wrote {arch} model to {out}")


@main.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Local diffusers Stable Diffusion directory (model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/).",
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
def quantize(
    model_dir: Path, bits: int | None, recipe: Path | None, grid: str | None, init: str, iters: int, bundle: bool, out: Path
) -> None:
    """Post-training quantization of the UNet into a packed .bfq checkpoint.

    Every conv/linear weight except the time-embedding layers is quantized per
    output channel; the time layers, biases and norms are kept. No training: the
    checkpoint is the starting point of 'bf train' and a baseline.
    """
    from bf.format import summarize
    from bf.models.directory import ModelDir
    from bf.trainer.pipeline import QuantizeRequest, quantize_model
    from bf.trainer.ptq import PTQConfig

    model = ModelDir.open(model_dir)
    req = QuantizeRequest(bits=bits, recipe=recipe, grid=grid, ptq=PTQConfig(init=init, iters=iters), bundle=bundle)
    ckpt = quantize_model(model, req, progress=_progress("quantize"), log=_log)
    ckpt.save(out)
    s = summarize(ckpt, out.stat().st_size)
    _log(
        f"wrote {out}: {s['quantized_layers']} layers, {s['avg_bits']:.3f} avg bits (paper's count), "
        f"{s['stored_bits_per_weight']:.3f} stored bits/weight, UNet {s['unet_bytes'] / 1e6:.2f} MB "
        f"({s['ratio_vs_fp16']:.2f}x smaller than FP16)"
    )


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("--layers/--no-layers", default=False, help="Also print the per-layer table.")
@click.option("--no-verify", is_flag=True, help="Skip the SHA-256 check of every tensor.")
def inspect(checkpoint: Path, as_json: bool, layers: bool, no_verify: bool) -> None:
    """Per-layer table and totals of a .bfq: bits, levels, stored size, ratio to FP16.

    avg_bits is the paper's count (log2 of the number of levels per weight, plus 16
    bits per cached time feature for a 50-step table, over all conv/linear weights);
    stored_bits_per_weight is what the disk holds (packed codes and scales). The
    time-embedding layers, kept for training and replaced by a table at export, are
    not counted in unet_bytes.
    """
    from bf.format import Checkpoint, summarize
    from bf.report import format_summary

    ckpt = Checkpoint.load(checkpoint, verify=not no_verify)
    s = summarize(ckpt, checkpoint.stat().st_size)
    if as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        click.echo(format_summary(s, checkpoint, show_layers=layers))


if __name__ == "__main__":
    main()
