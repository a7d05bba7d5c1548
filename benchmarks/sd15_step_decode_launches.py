"""The compiled SD-v1.5 step's decode alone, for each way to keep layers decoded: its launches as the step makes them
(one batched decode per group of bf.runtime.compiled_weights.decode_groups, one kernel per packing in it), all of
them replayed from one CUDA graph, without the step's compute. For the layers a benchmark run fused
(benchmarks/sd15_compiled_step.py's JSON, one configuration's "fused" names) and each budget kept decoded, chosen as

  smallest   the smallest layers (what the torch backend kept before)
  launches   whole decode kernels, the smallest first (bf.runtime.compiled_weights.fewest_launches_within)

Prints and writes each one's milliseconds, launches, kernels and FP16 bytes, and the launches policy's time against
the smallest layers' at each budget (tools/sd15_decode_launches.py counts the same without a GPU).

    python benchmarks/sd15_step_decode_launches.py results/sd15_compiled_step_choice_no_bias.json \\
        --config lowbit_compile_graph_cl_keepsmallest150MB_fused --keep 150,200 [--lib libbf_decode.so] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def main() -> None:
    from sd15_decode_launches import add_run_arguments, keeps_and_fused  # (tools/)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(ap, keep="150,200")
    ap.add_argument("--lib", type=Path, default=None, help="the decode library (default: found as bf.native says)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_step_decode_launches.json")
    args = ap.parse_args()
    keeps, fused = keeps_and_fused(args.keep, args.result, args.config)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark times CUDA decode kernels: run it on a machine with a CUDA GPU")
    from sd15_decode_launches import counts, kept_by, sd15_layers  # (tools/)
    from sd15_unet_step import random_packed

    from bf.cli.output import write_json
    from bf.decode_kernels import load
    from bf.runtime.compiled_weights import decode_groups
    from bf.runtime.torch_graph import graph_time_ms

    lib = load(args.lib)
    shapes, bits = sd15_layers()
    packed = random_packed({n: s for n, s in shapes.items() if n not in fused}, bits, True, seed=1, device="cuda")
    res = {"command": " ".join(["python", "benchmarks/sd15_step_decode_launches.py", *sys.argv[1:]]),
           "device": torch.cuda.get_device_properties(0).name, "torch": torch.__version__, "result": str(args.result),
           "config": args.config, "fused_layers": len(fused),
           "weights": "random codes of the benchmarks' 1.99-bit mix (sd15_unet_step.random_packed), channels-last", "rows": []}  # fmt: skip
    for mb in keeps:
        for by in ("smallest", "launches"):
            kept = kept_by(packed, mb, by)
            groups = [[packed[n] for n in members.values()] for members in decode_groups([n for n in packed if n not in kept]).values()]
            if not groups:
                raise SystemExit(f"error: --keep {mb} keeps every layer not fused decoded: nothing is left to time")
            flat = torch.empty(max(sum(w.numel for w in g) for g in groups), dtype=torch.float16, device="cuda")

            def outs(g, flat=flat):  # the group's weights side by side in one buffer, as the step's group decode
                views, at = [], 0
                for w in g:
                    views.append(flat[at : at + w.numel].view(w.spec.shape))
                    at += w.numel
                return views

            batches = [([(w.codes, w.scale, w.spec) for w in g], outs(g)) for g in groups]

            def decode_all(batches=batches):
                for batch, views in batches:
                    lib.decode_cuda_batch(batch, views)

            ms = graph_time_ms(decode_all, reps=5, replays=7)
            row = counts(packed, kept, mb, by) | {"decode_ms": ms}
            res["rows"].append(row)
            print(f"kept {mb} MB by {by}: {row['launches']} launches, {row['kernels']} kernels, {row['decoded_bytes'] / 1e9:.3f} GB: "
                  f"{ms:.3f} ms", flush=True)  # fmt: skip
            del flat, batches
    by_key = {(r["keep_mb"], r["by"]): r for r in res["rows"]}
    res["launches_vs_smallest"] = {f"{mb}MB": by_key[mb, "launches"]["decode_ms"] / by_key[mb, "smallest"]["decode_ms"] for mb in keeps}
    print(json.dumps(res["launches_vs_smallest"]), flush=True)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
