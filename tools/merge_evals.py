"""Merge ``bf eval --json`` files made on the same prompts and seeds (parallel processes, say one per model and CFG
scale) into one, with every pair of models' paired differences, as one ``bf eval`` of all the models would write.

``--recompute-intervals`` derives each split's intervals again from the per-image verdicts with this bf's
bf.evaluate (whether a split is whole, and so varies with its seeds alone, included): for files that an older bf
eval wrote. PSNR intervals, which need each image's MSE, are left as they are.

    python tools/merge_evals.py A.json B.json ... --order M1,M2,... [--recompute-intervals] --out merged.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bf.errors import BfError
from bf.evaluate.evaluation import paired_differences, prompt_sets, shapes_test_size, whole_split
from bf.evaluate.intervals import mean_ci
from bf.report import format_eval_table

SAME = ("prompts", "seeds", "seed", "steps", "scheduler", "limit", "images_per_split")  # what pairing needs equal


def merge(payloads: list[dict], order: list[str] | None = None) -> dict:
    """One payload: each (model, cfg, split) once (a model in several files must agree image for image), models in
    ``order`` (labels; the others after, as first seen), differences between every pair."""
    seen: dict[tuple, dict] = {}
    for p in payloads:
        for r in p["results"]:
            r.setdefault("seeds", p.get("config", {}).get("seeds", 1))  # (files of a bf eval that did not record it)
            key = (r["model"], r["cfg"], r["split"])
            if key in seen and seen[key].get("overall_per_image") != r.get("overall_per_image"):
                raise BfError(f"{key}: two files disagree on the same model's images; were they made with the same settings?")
            seen.setdefault(key, r)
    labels = list(dict.fromkeys(r["model"] for r in seen.values()))
    rank: dict[str, int] = {}
    for m in [*(order or []), *labels]:
        rank.setdefault(m, len(rank))
    rows = sorted(seen.values(), key=lambda r: (r["cfg"], r["split"], rank[r["model"]]))
    shapes = {}
    for r in rows:
        if shapes.setdefault((r["cfg"], r["split"]), (r["images"], r["seeds"])) != (r["images"], r["seeds"]):
            raise BfError(f"cfg {r['cfg']} {r['split']}: the files hold different prompts or seeds; they cannot be paired")
    configs = [p.get("config", {}) for p in payloads]
    for key in SAME:
        values = {json.dumps(cf.get(key)) for cf in configs}
        if len(values) > 1:
            raise BfError(f"the files differ in {key} ({', '.join(sorted(values))}); only evals of the same prompts and seeds pair")
    references = list(dict.fromkeys(cf["reference"] for cf in configs if cf.get("reference")))
    config = dict(configs[0]) | {"cfg": sorted({c for cf in configs for c in cf.get("cfg", [])}),
                                 "models": list(dict.fromkeys(m for cf in configs for m in cf.get("models", []))),
                                 "reference": references[0] if len(references) == 1 else references or None}  # fmt: skip
    return {"results": rows, "differences": paired_differences(rows), "config": config}


def recompute_intervals(payload: dict) -> None:
    """Each result's ``whole_split`` and accuracy interval again, from its per-image verdicts (a shapes-test eval)."""
    spec = payload["config"]["prompts"]
    if shapes_test_size(spec) is None:
        raise BfError(f"--recompute-intervals: the evals ran on {spec!r}, not on shapes-test splits")
    sets = {ps.split: ps for ps in prompt_sets(spec, payload["config"].get("limit"))}
    for r in payload["results"]:
        ps = sets[r["split"]]
        if r["images"] != len(ps.prompts) * r["seeds"]:
            raise BfError(f"{r['model']} {r['split']}: {r['images']} images are not {len(ps.prompts)} prompts x {r['seeds']} seeds")
        r["whole_split"] = whole_split(ps.split, ps.scenes)
        r["accuracy_ci95"] = mean_ci(np.array(r["overall_per_image"], dtype=np.float64).reshape(-1, r["seeds"]), r["whole_split"])
    payload["differences"] = paired_differences(payload["results"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--order", default="", help="Model labels in the order differences are taken (b - a: a listed first).")
    ap.add_argument("--recompute-intervals", action="store_true", help="Intervals again from the per-image verdicts.")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    try:
        merged = merge([json.loads(f.read_text()) for f in args.files], [m for m in args.order.split(",") if m])
        if args.recompute_intervals:
            recompute_intervals(merged)
    except BfError as e:
        sys.exit(f"error: {e}")
    args.out.write_text(json.dumps(merged, indent=1) + "\n")
    print(format_eval_table(merged["results"], merged["differences"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
