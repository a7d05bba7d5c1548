"""The 1.99-bit bit mix the SD-v1.5 benchmarks use (sizes and decode times, not quality).

The split is the shipped model's 1.99-bit recipe, by weights: 1 bit 75.3%, 2 bits 14.4%,
3 bits 8.0%, 4 bits 2.0%, 6 bits 0.4% (results/shapes_recipe_1.99.json), assigned in a fixed
pseudo-random order of the layers.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

SPLIT = [(6, 0.004), (4, 0.020), (3, 0.080), (2, 0.144)]  # the rest: 1 bit


def mixed_bits(candidates: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Bits per candidate layer, filled to the target shares of weights."""
    total = sum(math.prod(s) for s in candidates.values())
    order = sorted(candidates, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    bits, it = {}, iter(order)
    for b, share in SPLIT:
        got = 0
        for name in it:
            bits[name] = b
            got += math.prod(candidates[name])
            if got >= share * total:
                break
    for name in it:
        bits[name] = 1
    return bits


def mixed_recipe(model: Path) -> dict:
    """A `bf quantize --recipe` recipe giving the candidate layers of the model directory's UNet the mixed bits."""
    from safetensors import safe_open

    from bf.format import candidate_layers
    from bf.trainer.recipe import make_recipe

    shapes = {}
    for f in sorted((model / "unet").glob("*.safetensors")):
        with safe_open(f, "np") as sf:
            shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})  # noqa: SIM118
    return make_recipe("balanced", mixed_bits(candidate_layers(shapes)), kind="sd15-export-size")


def sd15_unet_shapes() -> dict[str, tuple[int, ...]]:
    """Every UNet parameter's shape of the SD-v1.5 architecture, without allocating weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from bf.models.architectures import ARCHITECTURES

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES["sd15"].unet)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}
