"""``bf quantize``: a model directory in, a packed checkpoint out (post-training only)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bf.errors import BfError
from bf.format import EDGE_BITS, Checkpoint, candidate_layers, quantizable_layers
from bf.models.directory import ModelDir, bundle_from_model_dir
from bf.provenance import provenance
from bf.trainer.ptq import PTQConfig, quantize_state_dict
from bf.trainer.recipe import load_recipe, plan_from_recipe, uniform_recipe


@dataclass(frozen=True)
class QuantizeRequest:
    bits: int | None = None  # uniform width for every candidate layer
    recipe: Path | None = None  # or a per-layer recipe file
    grid: str | None = None  # balanced | plain; default: the recipe's, else balanced
    ptq: PTQConfig = field(default_factory=PTQConfig)
    bundle: bool = False  # embed text encoder, VAE and small files


def quantize_model(
    model: ModelDir,
    req: QuantizeRequest,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    log: Callable[[str], None] = lambda msg: None,
) -> Checkpoint:
    if (req.bits is None) == (req.recipe is None):
        raise BfError("give exactly one of --bits B or --recipe FILE")
    recipe = None
    if req.recipe is not None:
        recipe = load_recipe(req.recipe, req.grid)
    log(f"reading UNet from {model.root}")
    unet_config = model.config("unet")  # a broken config must fail before minutes of quantizing
    state = model.read_weights("unet", framework="pt")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    quantizable = quantizable_layers(shapes)
    if not quantizable:
        raise BfError(f"{model.root}/unet has no conv or linear weights to quantize")
    if recipe is None:
        recipe = uniform_recipe(candidate_layers(shapes), req.bits, req.grid or "balanced")
    source = str(req.recipe) if req.recipe is not None else "--bits"
    plan = plan_from_recipe(recipe, quantizable, source)
    log(f"quantizing {len(plan)} layers ({recipe['grid']} grid, {req.ptq.init} init, edge layers at {EDGE_BITS} bits)")
    layers, tensors = quantize_state_dict(state, plan, req.ptq, progress)
    log("hashing the base model")
    base = {"path": str(model.root.resolve()), "hash": model.content_hash()}
    return Checkpoint(
        unet_config=unet_config,
        layers=layers,
        tensors=tensors,
        base_model=base,
        recipe={**recipe, "init": req.ptq.init, "alt_iters": req.ptq.iters if req.ptq.init == "alt" else None},
        provenance=provenance(),
        bundle=bundle_from_model_dir(model) if req.bundle else None,
    )
