"""Size of unet.onnx for the full-size SD-v1.5 architecture at a 1.99-bit mix, against its parts.

Builds a random SD-v1.5 model (sizes do not depend on the values), a recipe with the bit
split of the shipped model's 1.99-bit recipe (by weights: 1 bit 75.3%, 2 bits 14.4%,
3 bits 8.0%, 4 bits 2.0%, 6 bits 0.4%; results/shapes_recipe_1.99.json), quantizes, and
runs `bf export --target onnx` with its check, as a user would. CPU only, about 10 minutes
and 16 GB of memory. Writes results/sd15_export_sizes.json.

    python benchmarks/sd15_onnx_size.py --work /tmp/sd15x
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def bf(*args: str) -> str:
    print("$ bf", " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "bf.cli", *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (needs ~6 GB)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_export_sizes.json")
    args = ap.parse_args()
    from sd15_mix import mixed_recipe

    args.work.mkdir(parents=True, exist_ok=True)
    model, bfq, exp = args.work / "sd15", args.work / "sd15.bfq", args.work / "onnx"
    if not model.exists():
        bf("random-model", "--arch", "sd15", "--seed", "0", "--out", str(model))
    recipe_path = args.work / "recipe.json"
    recipe_path.write_text(json.dumps(mixed_recipe(model)))
    if not bfq.exists():
        bf("quantize", "--model", str(model), "--recipe", str(recipe_path), "--out", str(bfq))
    info = json.loads(bf("inspect", str(bfq), "--json"))
    t0 = time.time()
    manifest = json.loads(bf("export", str(bfq), "--target", "onnx", "--out", str(exp), "--json"))
    seconds = time.time() - t0
    br = manifest["graphs"]["unet"]["size_breakdown"]
    # The budget: packed layers + time table + fp16 biases and norms (the export already
    # stores those as float16, so other_tensors is their fp16 size).
    budget = manifest["packed_unet_bytes"] + br["time_table"] + br["other_tensors"]
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()})",
        "command": "python benchmarks/sd15_onnx_size.py " + " ".join(sys.argv[1:]),
        "bfq_avg_bits_paper": info.get("avg_bits"),
        "bfq_stored_bits_per_weight": info.get("stored_bits_per_weight"),
        "packed_unet_bytes": manifest["packed_unet_bytes"],
        "unet_onnx_bytes": br["total"],
        "breakdown": br,
        "budget_bytes": budget,
        "limit_bytes": int(budget * 1.03),
        "ratio_to_budget": br["total"] / budget,
        "check": manifest["check"],
        "export_seconds": round(seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
