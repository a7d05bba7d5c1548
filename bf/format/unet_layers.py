"""Which UNet tensors are quantized, which are kept, and which are time layers.

Names are diffusers parameter names (``down_blocks.0.resnets.0.conv1.weight``); a
layer is named by its module (the parameter name without ``.weight``).
"""

from __future__ import annotations

from collections.abc import Iterable

EDGE_LAYERS = ("conv_in", "conv_out")  # quantized at 8 bits, never analysed
EDGE_BITS = 8


def has_added_embedding(names: Iterable[str]) -> bool:
    """Whether a UNet's parameter names include SDXL's ``text_time`` added embedding (the pooled prompt and the
    micro-conditioning, added to the time embedding before the ResBlocks see it)."""
    return any(n.startswith("add_embedding.") for n in names)


def is_time_layer(param_name: str, added_embedding: bool = False) -> bool:
    """The layers whose output depends on the timestep alone.

    They are kept in full precision in a checkpoint and replaced by a precomputed time-feature table at export:
    the time-embedding MLP and every ResBlock's time projection; with an added embedding (SDXL,
    ``added_embedding``) the time-embedding MLP only, as the ResBlocks' projections then also see the prompt
    and are ordinary layers.
    """
    if param_name.startswith("time_embedding."):
        return True
    return not added_embedding and ".time_emb_proj." in param_name


def is_quantizable_weight(param_name: str, shape: tuple[int, ...], added_embedding: bool = False) -> bool:
    """Conv (4-D) and linear (2-D) weights outside the time layers."""
    return param_name.endswith(".weight") and len(shape) in (2, 4) and not is_time_layer(param_name, added_embedding)


def module_name(param_name: str) -> str:
    return param_name.removesuffix(".weight")


def quantizable_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape for every quantizable weight, in state-dict order."""
    added = has_added_embedding(shapes)
    return {module_name(k): tuple(s) for k, s in shapes.items() if is_quantizable_weight(k, tuple(s), added)}


def candidate_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Layers the mixed-precision analysis chooses bits for (docs/RECIPE.md section 3)."""
    return {m: s for m, s in quantizable_layers(shapes).items() if m not in EDGE_LAYERS}
