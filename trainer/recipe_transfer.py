"""A bit recipe for a UNet too big to analyse here, from an analysed model's recipe (docs/RECIPE.md section 3).

SDXL shares SD-v1.5's block types (ResBlock convolutions, attention projections, feed-forward layers, the
transformers' projections, down- and upsamplers). The transferred recipe gives each layer the width its counterpart in the
reference got, then meets the target average:

1. A layer's *type* is its name without block positions (``down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_k``
   -> ``attentions.transformer_blocks.attn2.to_k``); its *depth* is its position among the layers of that type,
   from 0 (first) to 1 (last).
2. Each layer's score is the width the reference gave the layer of the same type nearest in depth; types the
   reference lacks (SDXL's added embedding and time projections, time layers in SD-v1.5) take the reference's
   weight-median width.
3. Each layer takes its score; the layers ranked by score (deeper first among equals), the paper's average
   (bf.format.summary) is brought to the target: over it, wide layers are lowered one width, lowest-ranked first,
   until it is at most the target; under it, 1-bit layers are raised to the next width in rank order wherever the
   average stays at most the target. A model analysed itself gets its own recipe back.
"""

from __future__ import annotations

import math
import re

from bf.errors import BfError
from bf.format import EDGE_BITS, EDGE_LAYERS, Grid
from bf.format.summary import TIME_TABLE_STEPS, paper_average_bits, time_layer_counts

_CONTAINERS = re.compile(r"\.(resnets|attentions|transformer_blocks|downsamplers|upsamplers)\.\d+")


def layer_type(name: str) -> str:
    """``name`` without its block and container positions (``down_blocks.0.resnets.1.conv1`` -> ``resnets.conv1``);
    numbered leaves (``to_out.0``, ``ff.net.2``) keep their number."""
    base = re.sub(r"^(down_blocks|up_blocks)\.\d+\.|^mid_block\.", "", name)
    return _CONTAINERS.sub(r".\1", "." + base)[1:]


def _depths(names: list[str]) -> dict[str, tuple[str, float]]:
    by_type: dict[str, list[str]] = {}
    for n in names:
        by_type.setdefault(layer_type(n), []).append(n)
    return {n: (t, i / max(len(ns) - 1, 1)) for t, ns in by_type.items() for i, n in enumerate(ns)}


def weight_shares(bits: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> dict[int, float]:
    total = sum(math.prod(shapes[n]) for n in bits)
    shares: dict[int, float] = {}
    for n, b in bits.items():
        shares[b] = shares.get(b, 0.0) + math.prod(shapes[n]) / total
    return dict(sorted(shares.items()))


def transfer_recipe(
    reference: dict[str, int],
    reference_shapes: dict[str, tuple[int, ...]],
    target_shapes: dict[str, tuple[int, ...]],
    target_bits: float,
    grid: str = "balanced",
) -> tuple[dict[str, int], float]:
    """Bits per candidate layer of the target (``target_shapes``: its UNet's parameter shapes) and their paper average.

    ``reference``: an analysed recipe's layers (module name -> bits) and ``reference_shapes`` its UNet's parameter
    shapes."""
    from bf.format import candidate_layers

    ref_layers = candidate_layers(reference_shapes)
    missing = [n for n in reference if n not in ref_layers and n not in EDGE_LAYERS]
    if missing:
        raise BfError(f"the reference recipe names {len(missing)} layer(s) its model does not have, e.g. {missing[0]}")
    ref = {n: reference[n] for n in ref_layers if n in reference}  # in module order (depths), not the file's
    candidates = candidate_layers(target_shapes)
    if not candidates:
        raise BfError("the target UNet has no candidate layers")
    shares = weight_shares(ref, ref_layers)
    median, acc = 1, 0.0
    for b, s in shares.items():
        acc += s
        if acc >= 0.5:
            median = b
            break
    ref_depths = _depths(list(ref))
    by_type: dict[str, list[tuple[float, int]]] = {}
    for n, (t, d) in ref_depths.items():
        by_type.setdefault(t, []).append((d, ref[n]))
    score = {}
    for n, (t, d) in _depths(list(candidates)).items():
        near = min(by_type[t], key=lambda db: abs(db[0] - d)) if t in by_type else (d, median)
        score[n] = (near[1], d)
    ranked = sorted(candidates, key=lambda n: score[n], reverse=True)
    params = {n: math.prod(s) for n, s in candidates.items()}
    time_weights, per_step = time_layer_counts(target_shapes)
    edges = [(math.prod(target_shapes[f"{e}.weight"]), Grid(EDGE_BITS, grid).levels) for e in EDGE_LAYERS if f"{e}.weight" in target_shapes]

    def average(bits: dict[str, int]) -> float:
        rows = [(params[n], Grid(b, grid).levels) for n, b in bits.items()] + edges
        return paper_average_bits(rows, time_weights, TIME_TABLE_STEPS * per_step)

    bits = {n: score[n][0] for n in candidates}
    widths = sorted({*shares, 1})
    while average(bits) > target_bits:  # over the target: lower wide layers one width each, lowest-ranked first
        lowered = False
        for n in reversed(ranked):
            if bits[n] > 1:
                bits[n] = max(b for b in widths if b < bits[n])
                lowered = True
                if average(bits) <= target_bits:
                    break
        if not lowered:
            raise BfError(f"no recipe reaches {target_bits} bits on this UNet: every layer at 1 bit averages {average(bits):.3f}")
    step = min((b for b in widths if b > 1), default=None)
    for n in ranked:  # under it: raise 1-bit layers in rank order to the next width where the average stays under
        if step is not None and bits[n] == 1:
            trial = {**bits, n: step}
            if average(trial) <= target_bits:
                bits = trial
    return bits, average(bits)
