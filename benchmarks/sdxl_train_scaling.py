"""bf train's Stage I step time and peak GPU memory on one GPU and on several (DDP), from the runs of
benchmarks/sdxl_gpu.sh train: each run's log.csv (cumulative seconds per step) and its printed summary (the
"peak GPU memory" line). Writes the step time (median over the steps after the first two, which include CUDA's
warm-up), images per second (batch per GPU x GPUs / step time), the scaling efficiency against one GPU, and memory.

    python benchmarks/sdxl_train_scaling.py --run 1:OUT/sdxl_train_1gpu --run 2:OUT/sdxl_train_2gpu --out scaling.json
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import statistics
import sys
from pathlib import Path

SKIP = 2  # the first steps: allocation, cuDNN autotuning, NCCL set-up


def read_run(prefix: Path) -> dict:
    """``prefix``_log.csv and ``prefix``.txt."""
    with open(f"{prefix}_log.csv") as f:
        rows = list(csv.DictReader(f))
    seconds = [float(r["seconds"]) for r in rows]
    steps = [b - a for a, b in itertools.pairwise(seconds)][SKIP:]
    if not steps:
        raise SystemExit(f"{prefix}_log.csv: {len(rows)} steps, need at least {SKIP + 2}")
    text = Path(f"{prefix}.txt").read_text()
    peak = re.search(r"peak GPU memory ([0-9.]+) GB", text)
    return {"steps_logged": len(rows), "step_s_median": statistics.median(steps), "step_s_min": min(steps),
            "peak_gpu_memory_gb": float(peak.group(1)) if peak else None, "final_loss": float(rows[-1]["loss"])}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="GPUS:PREFIX", help="a run: GPU count and its files' prefix")
    ap.add_argument("--batch-per-gpu", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs = {}
    for spec in args.run:
        gpus, prefix = spec.split(":", 1)
        runs[int(gpus)] = read_run(Path(prefix))
    one = runs.get(1)
    for gpus, r in sorted(runs.items()):
        r["images_per_s"] = args.batch_per_gpu * gpus / r["step_s_median"]
        if one is not None:
            r["scaling_efficiency"] = r["images_per_s"] / (gpus * one["images_per_s"])
    result = {"command": "python benchmarks/sdxl_train_scaling.py " + " ".join(sys.argv[1:]), "batch_per_gpu": args.batch_per_gpu,
              "runs": {str(k): v for k, v in sorted(runs.items())}}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for gpus, r in sorted(runs.items()):
        mem = f"{r['peak_gpu_memory_gb']:.1f} GB" if r["peak_gpu_memory_gb"] is not None else "?"
        eff = f", scaling {r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else ""
        print(f"{gpus} GPU(s): {r['step_s_median'] * 1e3:.0f} ms/step, {r['images_per_s']:.2f} images/s, peak {mem}{eff}")


if __name__ == "__main__":
    main()
