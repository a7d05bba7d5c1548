"""Size and bit accounting of a checkpoint (what ``bf inspect`` prints).

Two counts are reported side by side:
- the paper's: a layer with L levels counts log2(L) bits per weight, plus 16 bits per
  cached time feature, over all conv/linear weights of the original UNet;
- the real one: bytes of packed codes (and scales) as stored on disk.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from bf.format.checkpoint import FORMAT_VERSION, Checkpoint
from bf.format.grid import Grid
from bf.format.unet_layers import has_added_embedding, is_time_layer

TIME_TABLE_STEPS = 50  # the paper caches features for 50 sampling steps
FP16_BYTES = 2


def paper_average_bits(layers: Iterable[tuple[int, int]], time_weight_params: int, time_features: int) -> float:
    """The paper's average: ``[sum N_i log2(L_i) + 16 N_tf] / N_w``.

    ``layers``: (parameters, levels) of every quantized layer; N_w counts those and the
    time layers' weights (the original UNet's conv/linear weights); N_tf cached features.
    """
    layers = list(layers)
    n_w = sum(n for n, _ in layers) + time_weight_params
    if not n_w:
        return float("nan")
    return (sum(n * math.log2(levels) for n, levels in layers) + 16 * time_features) / n_w


def time_layer_counts(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(weights of the time layers, time features per step) of a UNet's parameter shapes.

    The first is in the paper's N_w; the second, every ResBlock's time-projection
    width (with an added embedding, SDXL: the time embedding's width), is one row of the cached table.
    """
    added = has_added_embedding(shapes)
    weights = sum(math.prod(s) for k, s in shapes.items() if is_time_layer(k, added) and k.endswith(".weight") and len(s) in (2, 4))
    row = "time_embedding.linear_2.weight" if added else ".time_emb_proj.weight"
    per_step = sum(s[0] for k, s in shapes.items() if k.endswith(row))
    return weights, per_step


def summarize(ckpt: Checkpoint, file_bytes: int | None = None) -> dict:
    layers = []
    by_width: dict[tuple[int, str], list] = defaultdict(lambda: [0, 0, 0])  # layers, params, code bytes
    for layer in ckpt.layers.values():
        layers.append(
            {
                "name": layer.name,
                "shape": list(layer.shape),
                "params": layer.params,
                "bits": layer.grid.bits,
                "grid": layer.grid.kind,
                "levels": layer.grid.levels,
                "packing": layer.packing.name,
                "stored_bytes": layer.stored_bytes,
                "code_bits_per_weight": 8 * layer.codes.nbytes / layer.params,
            }
        )
        acc = by_width[(layer.grid.bits, layer.grid.kind)]
        acc[0] += 1
        acc[1] += layer.params
        acc[2] += layer.codes.nbytes

    quantized_params = sum(rec["params"] for rec in layers)
    quantized_bytes = sum(rec["stored_bytes"] for rec in layers)
    added = has_added_embedding(ckpt.tensors)  # (its biases are kept tensors, its weights quantized or kept)
    time_tensors = {k: v for k, v in ckpt.tensors.items() if is_time_layer(k, added)}
    other_tensors = {k: v for k, v in ckpt.tensors.items() if not is_time_layer(k, added)}
    time_weight_params, per_step = time_layer_counts({k: v.shape for k, v in ckpt.tensors.items()})
    n_tf = TIME_TABLE_STEPS * per_step
    unet_bytes = quantized_bytes + sum(v.nbytes for v in other_tensors.values())
    all_params = quantized_params + sum(v.size for v in ckpt.tensors.values())
    fp16_bytes = FP16_BYTES * all_params

    widths = [
        {
            "bits": bits,
            "grid": kind,
            "layers": n,
            "params": params,
            "paper_bits_per_weight": Grid(bits, kind).paper_bits,
            "code_bits_per_weight": 8 * nbytes / params,
        }
        for (bits, kind), (n, params, nbytes) in sorted(by_width.items())
    ]
    return {
        "format_version": FORMAT_VERSION,
        "family": "sdxl" if added else "sd15",  # SDXL: the UNet's text_time added embedding
        "layers": layers,
        "by_width": widths,
        "quantized_layers": len(layers),
        "quantized_params": quantized_params,
        "avg_bits": paper_average_bits(((rec["params"], rec["levels"]) for rec in layers), time_weight_params, n_tf),
        "avg_bits_time_table_steps": TIME_TABLE_STEPS,
        "stored_bits_per_weight": 8 * quantized_bytes / quantized_params if quantized_params else float("nan"),
        "unet_bytes": unet_bytes,
        "time_layers_bytes": sum(v.nbytes for v in time_tensors.values()),
        "time_table_bytes": FP16_BYTES * n_tf,
        "fp16_bytes": fp16_bytes,
        "ratio_vs_fp16": fp16_bytes / unet_bytes if unet_bytes else float("nan"),
        "unet_params": all_params,
        "file_bytes": file_bytes,
        "bundled": ckpt.bundle is not None,
        "base_model": ckpt.base_model,
    }
