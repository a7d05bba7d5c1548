"""The 1.99-bit recipe of the full-size SDXL UNet, transferred from the shipped model's analysed 1.99-bit recipe
(SD-v1.5 block types) by bf.trainer.recipe_transfer: the same weight shares of each width, the wide widths on the
layers whose same-type counterpart at the same relative depth got them, scaled to a paper average of 1.99 bits.

    python tools/sdxl_recipe.py [--arch sdxl] [--target-bits 1.99] [--out results/sdxl_recipe_1.99.json]

Needs no weights (the shapes come from the architecture). For an SDXL model of your own, analyse it (bf analyze,
bf allocate) where a GPU makes that affordable; without one, pass this recipe to bf quantize or bf train --recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sdxl", help="bf random-model architecture name of the target UNet.")
    ap.add_argument("--reference", type=Path, default=REPO / "results" / "shapes_recipe_1.99.json")
    ap.add_argument("--target-bits", type=float, default=1.99)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sdxl_recipe_1.99.json")
    args = ap.parse_args()

    from bf.format import Grid, QuantizedLayer, candidate_layers
    from bf.models.architectures import ARCHITECTURES
    from bf.models.directory import ModelDir
    from bf.models.shipped import shipped_model_dir
    from bf.trainer.recipe import load_recipe, make_recipe
    from bf.trainer.recipe_transfer import layer_type, transfer_recipe, weight_shares

    reference = load_recipe(args.reference)
    ref_shapes = {k: tuple(v.shape) for k, v in ModelDir.open(shipped_model_dir()).read_weights("unet").items()}
    target_shapes = unet_shapes(ARCHITECTURES[args.arch].unet)
    bits, avg = transfer_recipe(reference["layers"], ref_shapes, target_shapes, args.target_bits, reference["grid"])
    layers, ref_layers = candidate_layers(target_shapes), candidate_layers(ref_shapes)
    stored = sum(QuantizedLayer.stored_bytes_for(layers[n], Grid(b, reference["grid"])) for n, b in bits.items())
    by_type: dict[str, dict[int, float]] = {}
    for t in sorted({layer_type(n) for n in bits}):
        names = {n: b for n, b in bits.items() if layer_type(n) == t}
        by_type[t] = weight_shares(names, layers)
    recipe = make_recipe(
        reference["grid"],
        bits,
        kind="transferred",
        target_bits=args.target_bits,
        avg_bits=avg,
        reference={"recipe": str(args.reference.relative_to(REPO)), "hash": reference["hash"]},
        arch=args.arch,
        shares=weight_shares(bits, layers),
        reference_shares=weight_shares({n: b for n, b in reference["layers"].items() if n in ref_layers}, ref_layers),
        shares_by_type=by_type,
        candidate_code_bytes=stored,
        command="python tools/sdxl_recipe.py " + " ".join(sys.argv[1:]),
    )
    args.out.write_text(json.dumps(recipe, indent=1) + "\n")
    print(f"{args.arch}: {len(bits)} layers, paper average {avg:.4f} bits; weight shares by width "
          + ", ".join(f"{b} bit {s:.3f}" for b, s in recipe["shares"].items())
          + " (reference: " + ", ".join(f"{b} bit {s:.3f}" for b, s in recipe["reference_shares"].items()) + ")"
          + f"; candidate layers' codes and scales {stored / 1e6:.1f} MB -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
