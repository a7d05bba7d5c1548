"""bf inspect: what a .bfq holds."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("--layers/--no-layers", default=False, help="Also print the per-layer table.")
@click.option("--no-verify", is_flag=True, help="Skip verification: the header and tensor SHA-256 checks and the packed-code checks.")
def command(checkpoint: Path, as_json: bool, layers: bool, no_verify: bool) -> None:
    """Per-layer table and totals of a .bfq: bits, levels, stored size, ratio to FP16.

    avg_bits is the paper's count (log2 of the number of levels per weight, plus 16
    bits per cached time feature for a 50-step table, over all conv/linear weights);
    stored_bits_per_weight is what the disk holds (packed codes and scales). The
    time-embedding layers, kept for training and replaced by a table at export, are
    not counted in unet_bytes. CHECKPOINT shipped-1.99bit: the shipped BitsFusion model.
    """
    from bf.format import Checkpoint, summarize
    from bf.models.shipped import model_source
    from bf.report import format_summary

    checkpoint = model_source(checkpoint)
    ckpt = Checkpoint.load(checkpoint, verify=not no_verify)
    s = summarize(ckpt, checkpoint.stat().st_size)
    if as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        click.echo(format_summary(s, checkpoint, show_layers=layers))
