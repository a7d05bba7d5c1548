"""Which UNet tensors are quantized, which are kept, and which are time layers.

Names are diffusers parameter names (``down_blocks.0.resnets.0.conv1.weight``); a
layer is named by its module (the parameter name without ``.weight``).
"""

from __future__ import annotations

EDGE_LAYERS = ("conv_in", "conv_out")  # quantized at 8 bits, never analysed
EDGE_BITS = 8


def is_time_layer(param_name: str) -> bool:
    """The time-embedding MLP and every ResBlock's time projection.

    They are kept in full precision in a checkpoint and replaced by a precomputed
    time-feature table at export.
    """
    return param_name.startswith("time_embedding.") or ".time_emb_proj." in param_name


def is_quantizable_weight(param_name: str, shape: tuple[int, ...]) -> bool:
    """Conv (4-D) and linear (2-D) weights outside the time layers."""
    return param_name.endswith(".weight") and len(shape) in (2, 4) and not is_time_layer(param_name)


def module_name(param_name: str) -> str:
    return param_name.removesuffix(".weight")


def quantizable_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape for every quantizable weight, in state-dict order."""
    return {module_name(k): tuple(s) for k, s in shapes.items() if is_quantizable_weight(k, tuple(s))}


def candidate_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Layers the mixed-precision analysis chooses bits for (docs/RECIPE.md section 3)."""
    return {m: s for m, s in quantizable_layers(shapes).items() if m not in EDGE_LAYERS}
