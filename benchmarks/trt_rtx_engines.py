"""TensorRT for RTX engines built on a CPU: size, build time and peak build memory, FP16 against 1.99 bits.

For each model, every engine variant is one `bf export ... --target trt-rtx` run, as a user
would type it, in its own process (its peak resident memory is that process's):

- ``fp16``: the FP model directory exported to FP16 engines (the baseline);
- ``qdq``: the 1.99-bit .bfq, weights as DequantizeLinear over INT4/INT8 constants, FP16 compute;
- ``plugin``: the 1.99-bit .bfq with the LowBitDequant plugin (packed codes in the engine), when
  ``--plugin LIB`` is given.

Models: ``shipped`` (the package's model, with the 1.99-bit recipe in results/) and ``sd15`` (the
full SD-v1.5 architecture with random weights: sizes do not depend on the values; the 1.99-bit
mix of tools/sd15_mix.py). Engine caches are kept inside --work so nothing is reused from
earlier runs. Prints a table and writes JSON with ratios against the FP16 engine of the same run.

    python benchmarks/trt_rtx_engines.py --work /tmp/rtx --models shipped,sd15
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def run_bf(args: list[str], env: dict | None = None) -> tuple[str, float, int]:
    """``bf ARGS`` in its own process: (stdout, seconds, peak resident bytes of that process)."""
    print("$ bf", " ".join(args), flush=True)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "bf.cli", *args], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"bf {' '.join(args)} failed with exit code {proc.returncode}")
    return out, time.time() - t0, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def models(work: Path, which: list[str]) -> dict[str, tuple[Path, Path]]:
    """name -> (FP model directory, 1.99-bit .bfq), made if missing."""
    out = {}
    if "shipped" in which:
        from bf.models.shipped import model_source

        bfq = work / "shipped-1.99.bfq"
        if not bfq.exists():
            run_bf(["quantize", "--recipe", str(REPO / "results" / "shapes_recipe_1.99.json"), "--out", str(bfq)])
        out["shipped"] = (Path(model_source(None)), bfq)
    if "sd15" in which:
        from sd15_mix import mixed_recipe

        model, bfq = work / "sd15", work / "sd15-1.99.bfq"
        if not model.exists():
            run_bf(["random-model", "--arch", "sd15", "--seed", "0", "--dtype", "fp16", "--out", str(model)])
        if not bfq.exists():
            recipe = work / "sd15-recipe.json"
            recipe.write_text(json.dumps(mixed_recipe(model)))
            run_bf(["quantize", "--model", str(model), "--recipe", str(recipe), "--out", str(bfq)])
        out["sd15"] = (model, bfq)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (about 10 GB for sd15)")
    ap.add_argument("--models", default="shipped,sd15")
    ap.add_argument("--gpu-arch", default="86,89,120")
    ap.add_argument("--plugin", type=Path, default=None, help="libbf_trt_plugin.so built for TensorRT for RTX: adds the plugin variant")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "trt_rtx_engines.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BF_ENGINE_CACHE": str(args.work / "engine-cache")}
    import tensorrt_rtx

    variants = [("fp16", None), ("qdq", "qdq")] + ([("plugin", "plugin")] if args.plugin else [])
    result = {
        "command": "python benchmarks/trt_rtx_engines.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used",
        "tensorrt_rtx": tensorrt_rtx.__version__,
        "gpu_archs": args.gpu_arch.split(","),
        "models": {},
    }
    for name, (fp_dir, bfq) in models(args.work, args.models.split(",")).items():
        rows = {}
        for variant, weights in variants:
            out = args.work / f"{name}-{variant}"
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = ["export", str(fp_dir if weights is None else bfq), "--target", "trt-rtx", "--fp16", "--gpu-arch", args.gpu_arch,
                   "--out", str(out), "--no-check", "--json"]  # fmt: skip
            if weights:
                cmd += ["--weights", weights]
            if weights == "plugin":
                cmd += ["--plugin", str(args.plugin)]
            stdout, seconds, peak = run_bf(cmd, env)
            manifest = json.loads(stdout)
            engines = {g: e for g, e in manifest["engines"].items() if g != "plugin"}
            rows[variant] = {
                "engine_bytes": {g: e["bytes"] for g, e in engines.items()},
                "build_seconds": {g: e["build_seconds"] for g, e in engines.items()},  # None: the same graph, from the cache
                "onnx_unet_bytes": manifest["graphs"]["unet"]["size_breakdown"]["total"],
                "export_seconds": round(seconds, 1),
                "peak_rss_bytes": peak,
            }
            if weights:
                rows[variant]["packed_unet_bytes"] = manifest["packed_unet_bytes"]
            if weights == "plugin":  # loaded beside the engines, not inside them
                rows[variant]["plugin_library_bytes"] = (out / manifest["engines"]["plugin"]).stat().st_size
        base = rows["fp16"]["engine_bytes"]["unet"]
        for r in rows.values():
            r["unet_engine_vs_fp16"] = round(r["engine_bytes"]["unet"] / base, 4)
        result["models"][name] = rows
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    head = ["model", "variant", "unet engine", "vs fp16", "text enc.", "vae dec.", "unet build", "peak RSS"]
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(head, (8, 7, 12, 8, 10, 9, 11, 9), strict=True)))
    for name, rows in result["models"].items():
        for variant, r in rows.items():
            e, b = r["engine_bytes"], r["build_seconds"]
            print(f"{name:8} {variant:7} {e['unet'] / 1e6:10.1f}MB {r['unet_engine_vs_fp16']:8.3f} {e['text_encoder'] / 1e6:8.1f}MB "
                  f"{e['vae_decoder'] / 1e6:7.1f}MB {b['unet'] or 0:10.1f}s {r['peak_rss_bytes'] / 2**30:7.1f}GiB")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
