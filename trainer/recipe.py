"""Bit recipes: which bit width each layer gets, as a plain JSON keyed by module name.

{"format": "bf.recipe", "version": 1, "grid": "balanced",
 "layers": {"down_blocks.0.resnets.0.conv1": 2, ...}, "hash": "sha256:..."}

The hash covers ``grid`` and ``layers``, so an edited recipe is noticed; delete the
``hash`` field to accept hand edits. A .bfq stores the recipe it was made with, hash
included (docs/FORMAT.md section 2 says how to recompute it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bf.errors import BfError
from bf.format import EDGE_BITS, EDGE_LAYERS, GRID_KINDS, Grid

RECIPE_FORMAT = "bf.recipe"
RECIPE_VERSION = 1


def recipe_hash(grid: str, layers: dict[str, int]) -> str:
    """SHA-256 of ``{"grid": ..., "layers": ...}`` as the canonical JSON of docs/FORMAT.md section 2."""
    canon = json.dumps({"grid": grid, "layers": dict(sorted(layers.items()))}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def make_recipe(grid: str, layers: dict[str, int], **meta) -> dict:
    return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "grid": grid, "layers": layers, "hash": recipe_hash(grid, layers), **meta}


def uniform_recipe(candidates: dict[str, tuple[int, ...]], bits: int, grid: str) -> dict:
    return make_recipe(grid, {name: bits for name in candidates}, kind="uniform")


def load_recipe(path: str | Path, grid_flag: str | None = None) -> dict:
    """The recipe in ``path``, validated; ``grid_flag`` (a --grid given with it) must agree with its grid."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BfError(f"{path}: no such recipe file; make one with 'bf allocate' or pass --bits") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON and non-UTF-8 bytes (UnicodeDecodeError)
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BfError(f"{path}: not a readable recipe JSON ({detail})") from None
    if not isinstance(obj, dict) or obj.get("format") != RECIPE_FORMAT:
        raise BfError(f'{path}: not a bf recipe (expected "format": "{RECIPE_FORMAT}")')
    if obj.get("version") != RECIPE_VERSION:
        raise BfError(f"{path}: recipe version {obj.get('version')!r} is not supported (this bf reads {RECIPE_VERSION})")
    grid, layers = obj.get("grid", "balanced"), obj.get("layers")
    if grid not in GRID_KINDS:
        raise BfError(f"{path}: grid must be one of {', '.join(GRID_KINDS)}, got {grid!r}")
    # type(), not isinstance: JSON true parses as a bool, which isinstance counts as an int (and hashes as "true").
    if not isinstance(layers, dict) or not all(type(b) is int and 1 <= b <= 8 for b in layers.values()):
        raise BfError(f'{path}: "layers" must map module names to bit widths 1..8')
    if "hash" in obj and obj["hash"] != recipe_hash(grid, layers):
        raise BfError(f'{path}: recipe hash does not match its layers (edited by hand?); delete the "hash" field to accept the edit')
    if grid_flag is not None and grid_flag != grid:
        raise BfError(f"--grid {grid_flag} contradicts the grid of {path} ('{grid}'); drop --grid")
    # A recipe without grid or hash (a hand edit) is recorded with both, so every .bfq's recipe has them.
    return {**obj, "grid": grid, "hash": recipe_hash(grid, layers)}


def plan_from_recipe(recipe: dict, quantizable: dict[str, tuple[int, ...]], source: str = "recipe") -> dict[str, Grid]:
    """Grid of every quantizable layer; edge layers default to 8 bits."""
    layers = recipe["layers"]
    unknown = sorted(set(layers) - set(quantizable))
    if unknown:
        raise BfError(
            f"{source}: {len(unknown)} layer(s) not in this UNet, e.g. {unknown[0]}; was it made for another model? "
            "Make one for this UNet with bf analyze and bf allocate"
        )
    missing = sorted(m for m in quantizable if m not in layers and m not in EDGE_LAYERS)
    if missing:
        raise BfError(f"{source}: no bit width for {len(missing)} layer(s) of this UNet, e.g. {missing[0]}")
    bits = {m: layers.get(m, EDGE_BITS) for m in quantizable}
    return {m: Grid(b, recipe["grid"]) for m, b in bits.items()}
