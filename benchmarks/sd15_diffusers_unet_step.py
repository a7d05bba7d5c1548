"""SD-v1.5's UNet as diffusers runs it, 1.99-bit through the bitsfusion backend (bf.diffusers) against FP16, one run.

Random weights (the 1.99-bit mix of the other SD-v1.5 benchmarks), 512x512, batch 2, fp16, NCHW (diffusers' default),
the UNet called as a diffusers pipeline calls it (``unet(sample, t, encoder_hidden_states).sample``):

  fp16_eager              diffusers' FP16 UNet
  fp16_compile            the same under torch.compile(mode="reduce-overhead") (inductor, CUDA graphs)
  bitsfusion_eager        the bitsfusion layers (packed codes on the GPU), each weight decoded by the CUDA kernels
                          on every call: what from_pretrained gives
  bitsfusion_kept         the same with keep_decoded (each weight decoded at its first call and kept)
  bitsfusion_compile      bf.runtime.diffusers_layers.compile_low_bit_layers (one decode launch per block inside the
                          model), then torch.compile(mode="reduce-overhead")

The bitsfusion layers are built in memory as diffusers' loader builds them (bf.diffusers.layers.low_bit_layer, codes
and scales put in place), from random valid codes. Ratios are against fp16_eager and against the faster FP16.

    python benchmarks/sd15_diffusers_unet_step.py [--out results/sd15_diffusers_unet_step.json] [--iters 30]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
from sd15_compiled_step import timed, warm_up  # noqa: E402
from sd15_unet_step import clean, random_packed, run_record, sd15_mixed_unet  # noqa: E402

DEV = "cuda"


def bitsfusion_unet(master, packed: dict, keep_decoded: bool):
    """``master`` (copied) with its quantized layers as the bitsfusion backend's LowBitLayers holding ``packed``'s codes."""
    from bf.diffusers.layers import low_bit_layer
    from bf.module_paths import parent_and_attribute

    unet = copy.deepcopy(master)
    for name, pw in packed.items():
        parent, child = parent_and_attribute(unet, name)
        module = getattr(parent, child)
        layer = low_bit_layer(module, tuple(module.weight.shape), pw.spec.grid, keep_decoded, device=DEV)
        layer.codes.copy_(pw.codes)
        layer.scale.copy_(pw.scale.float())
        setattr(parent, child, layer)
    return unet.to(DEV)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, default=None, help="the decode library (default: found as bf.native says)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_diffusers_unet_step.json")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--configs", default="fp16_eager,fp16_compile,bitsfusion_eager,bitsfusion_kept,bitsfusion_compile")
    args = ap.parse_args()

    from bf.decode_kernels import load
    from bf.runtime.diffusers_layers import compile_low_bit_layers

    if args.lib:  # the eager bitsfusion layers find the library by this variable
        os.environ["BF_DECODE_LIB"] = str(args.lib)
    lib = load(args.lib)
    res: dict = run_record("benchmarks/sd15_diffusers_unet_step.py", args)
    master, shapes, bits = sd15_mixed_unet()
    packed = random_packed(shapes, bits, False, seed=1)  # diffusers' layout: NCHW
    g = torch.Generator(device=DEV).manual_seed(0)
    b, h = args.batch, args.size // 8
    sample, ctx = torch.randn(b, 4, h, h, device=DEV, generator=g).half(), torch.randn(b, 77, 768, device=DEV, generator=g).half()
    t = torch.tensor(500, device=DEV)
    configs: dict = {}
    outputs: dict = {}
    for name in args.configs.split(","):
        base = clean()
        if name.startswith("fp16"):
            unet = copy.deepcopy(master).to(DEV)
        else:
            unet = bitsfusion_unet(master, packed, keep_decoded=name == "bitsfusion_kept")
            if name == "bitsfusion_compile":
                compile_low_bit_layers(unet, decoder=lib)
        graphed = name.endswith("compile")
        model = torch.compile(unet, mode="reduce-overhead") if graphed else unet
        gc.collect()  # what building the model left behind (the replaced layers' codes) is not this configuration's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

        def step(model=model, graphed=graphed):
            if graphed:
                torch.compiler.cudagraph_mark_step_begin()
            return model(sample, t, ctx).sample

        with torch.inference_mode():
            extra = {"warmup_s": warm_up(lambda *a, step=step: step(), ())}
            configs[name] = timed(step, args.iters) | extra
            outputs[name] = step().float().clone()
        configs[name]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        configs[name]["resident_bytes"] = torch.cuda.memory_allocated() - base
        c = configs[name]
        print(f"{name}: {c['median_ms']:.3f} ms/step, peak {c['peak_mem_bytes'] / 1e9:.3f} GB, warm-up {c['warmup_s']:.1f} s", flush=True)
        model = unet = step = None  # step's defaults hold the model: kept, it would count in the next configuration's base
        torch._dynamo.reset()
    fp16 = [k for k in configs if k.startswith("fp16")]
    best = min(fp16, key=lambda k: configs[k]["median_ms"]) if fp16 else None
    for c in configs.values():
        if "fp16_eager" in configs:
            c["step_vs_fp16_eager"] = c["median_ms"] / configs["fp16_eager"]["median_ms"]
            c["peak_mem_vs_fp16_eager"] = c["peak_mem_bytes"] / configs["fp16_eager"]["peak_mem_bytes"]
        if best:
            c["step_vs_best_fp16"] = c["median_ms"] / configs[best]["median_ms"]
            c["peak_mem_vs_best_fp16"] = c["peak_mem_bytes"] / configs[best]["peak_mem_bytes"]
    ref = outputs.get("bitsfusion_kept")
    checks = {k: {"max_abs_diff_vs_kept": (v - ref).abs().max().item(), "ref_max_abs": ref.abs().max().item()}
              for k, v in outputs.items() if ref is not None and k.startswith("bitsfusion")}  # fmt: skip
    res.update(best_fp16_config=best, configs=configs, checks=checks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(checks, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
