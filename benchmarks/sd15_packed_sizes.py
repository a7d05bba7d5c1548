"""Stored bits per weight of `bf quantize --bits B` on the full-size SD-v1.5 architecture.

Runs the CLI as a user would (random weights: the sizes do not depend on the values),
then writes results/sd15_ptq_sizes.json. CPU only; about 2 minutes per width.

    python benchmarks/sd15_packed_sizes.py --work /tmp/sd15 [--bits 1,2,3,4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

LIMITS = {1: 1.61, 2: 2.34, 3: 3.34, 4: 4.34, 5: 5.5, 6: 6.5, 7: 7.5, 8: 8.5}
REPO = Path(__file__).resolve().parents[1]


def bf(*args: str) -> str:
    cmd = [sys.executable, "-m", "bf.cli", *args]
    print("$ bf", " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (needs ~8 GB)")
    ap.add_argument("--bits", default="1,2,3,4")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_ptq_sizes.json")
    args = ap.parse_args()
    model = args.work / "sd15"
    if not model.exists():
        bf("random-model", "--arch", "sd15", "--seed", "0", "--out", str(model))
    rows = []
    for bits in [int(b) for b in args.bits.split(",")]:
        out = args.work / f"sd15-{bits}bit.bfq"
        t0 = time.perf_counter()
        bf("quantize", "--model", str(model), "--bits", str(bits), "--out", str(out), "--force")
        seconds = time.perf_counter() - t0
        s = json.loads(bf("inspect", str(out), "--json"))
        width = next(w for w in s["by_width"] if w["bits"] == bits)
        rows.append(
            {
                "bits": bits,
                "command": f"bf quantize --model sd15 --bits {bits} --out sd15-{bits}bit.bfq",
                "layers": width["layers"],
                "params": width["params"],
                "paper_bits_per_weight": width["paper_bits_per_weight"],
                "code_bits_per_weight": width["code_bits_per_weight"],
                "limit": LIMITS[bits],
                "within_limit": width["code_bits_per_weight"] <= LIMITS[bits],
                "stored_bits_per_weight_with_scales": s["stored_bits_per_weight"],
                "avg_bits_paper": s["avg_bits"],
                "unet_bytes": s["unet_bytes"],
                "fp16_bytes": s["fp16_bytes"],
                "ratio_vs_fp16": s["ratio_vs_fp16"],
                "quantize_seconds": round(seconds, 1),
            }
        )
        out.unlink()
    result = {
        "command": "python benchmarks/sd15_packed_sizes.py " + " ".join(sys.argv[1:]),
        "what": "bf quantize --bits B on SD-v1.5's architecture (random weights), bf inspect --json",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'bits':>4} {'code b/w':>9} {'limit':>6} {'w/ scales':>9} {'UNet MB':>8} {'x FP16':>7} {'s':>6}")
    for r in rows:
        print(
            f"{r['bits']:>4} {r['code_bits_per_weight']:>9.4f} {r['limit']:>6} {r['stored_bits_per_weight_with_scales']:>9.4f} "
            f"{r['unet_bytes'] / 1e6:>8.1f} {r['ratio_vs_fp16']:>7.2f} {r['quantize_seconds']:>6}"
        )


if __name__ == "__main__":
    main()
