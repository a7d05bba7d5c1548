"""The packed size of the full-size SDXL UNet at 1.99 bits, as a user makes it.

Runs the CLI as a user would on SDXL base 1.0's architecture with random weights (sizes do not depend on the
values): bf random-model --arch sdxl, bf quantize --recipe results/sdxl_recipe_1.99.json (the transferred recipe,
tools/sdxl_recipe.py), bf inspect --json; then writes results/sdxl_packed_size.json with the bytes against FP16 and
the 0.70 GB target. CPU only: about 5 minutes and 7 GB of memory on 2 cores; ~8 GB of scratch disk.

    python benchmarks/sdxl_packed_size.py --work /tmp/sdxl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_BYTES = 0.70e9


def bf(*args: str) -> str:
    cmd = [sys.executable, "-m", "bf.cli", *args]
    print("$ bf", " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (about 8 GB)")
    ap.add_argument("--recipe", type=Path, default=REPO / "results" / "sdxl_recipe_1.99.json")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sdxl_packed_size.json")
    args = ap.parse_args()
    model, bfq = args.work / "sdxl", args.work / "sdxl-1.99.bfq"
    if not model.exists():
        bf("random-model", "--arch", "sdxl", "--dtype", "fp16", "--seed", "0", "--out", str(model))
    t0 = time.perf_counter()
    bf("quantize", "--model", str(model), "--recipe", str(args.recipe), "--out", str(bfq), "--force")
    seconds = time.perf_counter() - t0
    s = json.loads(bf("inspect", str(bfq), "--json"))
    result = {
        "command": "python benchmarks/sdxl_packed_size.py " + " ".join(sys.argv[1:]),
        "what": "bf quantize --recipe results/sdxl_recipe_1.99.json on SDXL base 1.0's architecture (random weights), bf inspect --json",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "recipe": str(args.recipe.relative_to(REPO)) if args.recipe.is_relative_to(REPO) else str(args.recipe),
        "avg_bits_paper": s["avg_bits"],
        "stored_bits_per_weight": s["stored_bits_per_weight"],
        "by_width": s["by_width"],
        "quantized_layers": s["quantized_layers"],
        "unet_params": s["unet_params"],
        "unet_bytes": s["unet_bytes"],
        "fp16_bytes": s["fp16_bytes"],
        "ratio_vs_fp16": s["ratio_vs_fp16"],
        "time_table_bytes": s["time_table_bytes"],
        "target_bytes": TARGET_BYTES,
        "within_target": s["unet_bytes"] <= TARGET_BYTES,
        "file_bytes": bfq.stat().st_size,
        "quantize_seconds": round(seconds, 1),
        "quantize_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"SDXL at {s['avg_bits']:.3f} bits (paper), {s['stored_bits_per_weight']:.4f} stored bits/weight: packed UNet "
          f"{s['unet_bytes'] / 1e9:.3f} GB (target {TARGET_BYTES / 1e9:.2f}), FP16 {s['fp16_bytes'] / 1e9:.2f} GB, "
          f"{s['ratio_vs_fp16']:.2f}x smaller; quantize {seconds:.0f} s -> {args.out}")  # fmt: skip
    bfq.unlink()


if __name__ == "__main__":
    main()
