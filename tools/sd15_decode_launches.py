"""What SD-v1.5's compiled 1.99-bit step decodes in its stream, counted without a GPU: for the layers a benchmark run
fused (benchmarks/sd15_compiled_step.py's JSON, one configuration's "fused" names) and each budget of layers kept
decoded, the decode launches (one per group, bf.runtime.compiled_weights.decode_groups), the kernels they run (one per
packing in a group: the decode kernel is compiled per packing) and the FP16 bytes they write, for each way to choose
the kept layers:

  smallest   the smallest layers (bf.runtime.streamed_weights.smallest_within: what the torch backend keeps)
  launches   whole decode kernels, the smallest first (bf.runtime.compiled_weights.fewest_launches_within)

The layer shapes come from SD-v1.5's architecture (built on the meta device), the bits from the benchmarks' 1.99-bit
mix (tools/sd15_mix.py), so the counts are those of the benchmark's step.

    python tools/sd15_decode_launches.py results/sd15_compiled_step_choice_no_bias.json \\
        --config lowbit_compile_graph_cl_keepsmallest150MB_fused --keep 0,120,150,200 [--out counts.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def sd15_layers() -> tuple[dict, dict]:
    """SD-v1.5's quantizable layers' weight shapes and the 1.99-bit mix's bits for each (the benchmarks' sd15_mixed_unet,
    on the meta device: no weights made)."""
    import torch
    from diffusers import UNet2DConditionModel
    from sd15_mix import mixed_bits

    from bf.format import quantizable_layers
    from bf.format.unet_layers import EDGE_BITS, EDGE_LAYERS
    from bf.models.architectures import ARCHITECTURES

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES["sd15"].unet)
    shapes = quantizable_layers({k: tuple(v.shape) for k, v in unet.state_dict().items()})
    bits = mixed_bits({k: v for k, v in shapes.items() if k not in EDGE_LAYERS}) | dict.fromkeys(EDGE_LAYERS, EDGE_BITS)
    return shapes, bits


def add_run_arguments(ap: argparse.ArgumentParser, keep: str) -> None:
    """The arguments naming a benchmark run's fused layers and the budgets to keep decoded (``keep``: the default)."""
    ap.add_argument("result", type=Path, help="a JSON of benchmarks/sd15_compiled_step.py")
    ap.add_argument("--config", required=True, help="the configuration whose fused layers to leave out (its 'fused' names)")
    ap.add_argument("--keep", default=keep, help="MB kept decoded, comma-separated")


def keeps_and_fused(keep: str, result: Path, config: str) -> tuple[list[int], set[str]]:
    """--keep's MB and the fused layers of configuration ``config`` in ``result`` (sd15_compiled_step.py's JSON), checked;
    a one-line SystemExit where either is wrong."""
    try:
        keeps = [int(x) for x in keep.split(",") if x]
    except ValueError:
        raise SystemExit(f"error: --keep {keep!r}: give MB as integers, e.g. 0,120,150") from None
    if not keeps or min(keeps) < 0:
        raise SystemExit(f"error: --keep {keep!r}: give one or more MB, 0 or more")
    try:
        configs = json.loads(result.read_text())["configs"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {result} is not a JSON that sd15_compiled_step.py wrote ({e})") from None
    if not isinstance(configs.get(config, {}).get("fused"), dict):
        named = ", ".join(k for k, c in configs.items() if isinstance(c.get("fused"), dict)) or "none"
        raise SystemExit(f"error: {result} has no configuration {config!r} with fused layers (those it has: {named})")
    return keeps, set(configs[config]["fused"])


def kept_by(packed: dict, keep_mb: int, by: str) -> set:
    """The layers of ``packed`` (the layers not fused) kept decoded within ``keep_mb`` MB of FP16, chosen ``by``."""
    from bf.runtime.compiled_weights import fewest_launches_within
    from bf.runtime.streamed_weights import smallest_within

    budget = keep_mb * 2**20 // 2  # fp16 elements
    return fewest_launches_within(packed, budget) if by == "launches" else smallest_within({n: w.numel for n, w in packed.items()}, budget)


def counts(packed: dict, kept: set, keep_mb: int, by: str) -> dict:
    """The step's decode of ``packed`` (the layers not fused) with ``kept`` (``kept_by(packed, keep_mb, by)``) decoded."""
    from bf.runtime.compiled_weights import decode_groups, decode_kernels

    rest = {n: w for n, w in packed.items() if n not in kept}
    return {"keep_mb": keep_mb, "by": by, "kept_layers": len(kept), "kept_bytes": sum(2 * packed[n].numel for n in kept),
            "launches": len(decode_groups(list(rest))), "kernels": decode_kernels(rest),
            "decoded_bytes": sum(2 * w.numel for w in rest.values())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(ap, keep="0,120,150,200")
    ap.add_argument("--out", type=Path, default=None, help="write the counts here (JSON)")
    args = ap.parse_args()
    keeps, fused = keeps_and_fused(args.keep, args.result, args.config)

    from bf.format.dequant_op import DequantSpec
    from bf.format.grid import Grid
    from bf.runtime.streamed_weights import PackedWeight

    shapes, bits = sd15_layers()
    unknown = sorted(fused - set(shapes))
    if unknown:
        raise SystemExit(f"error: {args.config}'s fused layers are not SD-v1.5's: {', '.join(unknown[:3])}")
    import torch

    empty = torch.empty(0)  # counting needs the layers' shapes and packings, not their codes
    packed = {n: PackedWeight(empty, empty, DequantSpec(tuple(s), Grid(bits[n]))) for n, s in shapes.items() if n not in fused}
    rows = [counts(packed, kept_by(packed, mb, by), mb, by) for mb in keeps for by in ("smallest", "launches")]
    total = sum(2 * w.numel for w in packed.values())
    print(f"{len(fused)} layers fused, {len(packed)} decoded in the step or kept ({total / 1e9:.3f} GB)")
    print(f"{'kept':>8s} {'by':>9s} {'layers':>7s} {'MB':>7s} {'launches':>9s} {'kernels':>8s} {'decoded GB':>11s}")
    for r in rows:
        print(f"{r['keep_mb']:>6d}MB {r['by']:>9s} {r['kept_layers']:>7d} {r['kept_bytes'] / 2**20:>7.1f} {r['launches']:>9d} "
              f"{r['kernels']:>8d} {r['decoded_bytes'] / 1e9:>11.3f}")  # fmt: skip
    if args.out:
        from bf.cli.output import write_json
        from bf.errors import BfError

        try:
            write_json(args.out, {"command": "python tools/sd15_decode_launches.py " + " ".join(sys.argv[1:]),
                                  "result": str(args.result), "config": args.config, "fused_layers": len(fused), "rows": rows})  # fmt: skip
        except BfError as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
