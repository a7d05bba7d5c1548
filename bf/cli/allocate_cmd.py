"""bf allocate: a bit recipe from an analysis."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bf.cli.checks import check_outputs


@click.command("allocate")
@click.argument("analysis", type=click.Path(path_type=Path))
@click.option("--target-bits", type=click.FloatRange(1.0, 8.0), default=1.99, show_default=True, help="Average bits (paper's count).")
@click.option("--eta", type=click.FloatRange(0.0, 2.0), default=0.3, show_default=True, help="Sensitivity S = MSE * N^-eta.")
@click.option("--grid", type=click.Choice(["balanced", "plain"]), default="balanced", show_default=True, help="Grid the recipe is for.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The recipe JSON to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the recipe's summary as one JSON object.")
def command(analysis: Path, target_bits: float, eta: float, grid: str, out: Path, as_json: bool) -> None:
    """Choose every layer's bit width from a 'bf analyze' result.

    Sensitivity S = MSE * N^-eta per layer and width; each layer takes the smallest
    width in 1..3 under a threshold (else 4), the threshold found by bisection so the
    average hits --target-bits; layers with the largest 3-bit semantic drop (above the
    90th/95th/98th percentile) get +1/+2/+3 bits; conv_in/conv_out stay at 8 bits.
    Prints the histogram and both averages: the paper's count and the real stored bits.
    """
    from bf.atomic import atomic_path
    from bf.report import format_allocation
    from bf.trainer.allocate import allocate, load_analysis

    check_outputs(out=out)
    recipe = allocate(load_analysis(analysis), target_bits, eta=eta, grid=grid, source=str(analysis))
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(recipe, indent=1))
    if as_json:
        click.echo(json.dumps({k: v for k, v in recipe.items() if k != "layers"} | {"out": str(out)}))
    else:
        click.echo(format_allocation(recipe, out))
