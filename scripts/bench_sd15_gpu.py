"""Issue 8's figures: the full-size SD-v1.5 UNet at the 1.99-bit mix against FP16, on one GPU.

Random weights (speed and memory do not depend on the values), 512x512, batch 2 (one image
with classifier-free guidance), fp16. Every configuration is measured in this one run:

  eager_fp16       diffusers' UNet2DConditionModel in eager mode (the usual way to run it)
  graph_fp16       the torch backend's UNet (time-feature table, by step index) with FP16
                   weights, its step replayed from a CUDA graph; NCHW and channels-last
  graph_streamed   the same UNet with the 1.99-bit packed codes resident and every weight
                   decoded just before its layer into a ring of reused buffers, on a side
                   stream overlapping compute (bf.runtime.streamed_weights), CUDA graph

plus the decode alone (the ring's launches in order, nothing else), the
bf16 matrix-product rate of this GPU and the UNet's operation count. Peak memory is what a
configuration allocates on top of an empty GPU (weights, codes, ring, graph pool). Writes
results/bench_sd15_gpu.json.

    python scripts/bench_sd15_gpu.py [--lib libbf_decode.so] [--out results/bench_sd15_gpu.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
from sd15_mix import mixed_bits

from bf.decode_kernels import load
from bf.format import quantizable_layers
from bf.format.dequant_op import DequantSpec
from bf.format.grid import Grid
from bf.format.packing import pack_codes
from bf.format.unet_layers import EDGE_BITS, EDGE_LAYERS
from bf.models.architectures import ARCHITECTURES
from bf.models.time_cache import cache_time_features
from bf.runtime.streamed_weights import PackedWeight, quantized_modules, stream_weights
from bf.runtime.torch_graph import GraphedCall, cuda_time_ms, unet_step

REPO = Path(__file__).resolve().parents[1]
DEV = "cuda"


def time_ms(fn, iters: int, warmup: int = 3) -> list[float]:
    return cuda_time_ms(fn, iters, warmup)


def stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": len(times)}


def clean() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def matmul_tflops(dtype=torch.bfloat16, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device=DEV, dtype=dtype), torch.randn(n, n, device=DEV, dtype=dtype)
    ms = statistics.median(time_ms(lambda: a @ b, 20, 5))
    return 2 * n**3 / ms / 1e9


def random_packed(shapes: dict, bits: dict, channels_last: bool, seed: int) -> dict[str, PackedWeight]:
    """Valid random codes in the stored layout; scales put the weights at diffusers' init magnitude."""
    rng = np.random.default_rng(seed)
    cache, out = {}, {}
    for name, shape in shapes.items():
        grid = Grid(bits[name])
        cl = channels_last and len(shape) == 4
        stored = (shape[0], *shape[2:], shape[1]) if cl else shape
        spec = DequantSpec(tuple(stored), grid)
        key = (spec.shape, grid)
        if key not in cache:  # packing on the CPU is the slow part; equal shapes share codes (each layer its own copy)
            cache[key] = pack_codes(rng.integers(0, grid.levels, spec.shape, dtype=np.int32), spec.packing)
        fan_in = math.prod(shape[1:])
        scale = torch.full((shape[0],), 1.0 / math.sqrt(fan_in) / grid.qmax, device=DEV)
        out[name] = PackedWeight(torch.from_numpy(cache[key]).to(DEV), scale, spec, cl)
    return out


def check_against_decoded(master, timesteps, packed: dict, cl: bool, lib, out: torch.Tensor, inputs) -> dict:
    """The streamed, graphed step against the same codes decoded once into FP16 weights, run eagerly."""
    cached = cache_time_features(copy.deepcopy(master), timesteps).to(DEV)
    for name, module in quantized_modules(cached.unet, packed).items():
        w = packed[name]
        buf = torch.empty(w.numel, dtype=torch.float16, device=DEV)
        lib.decode_cuda(w.codes, w.scale, w.spec, out=buf.view(w.spec.shape))
        module.weight.data.copy_(w.view(buf))
    if cl:
        cached = cached.to(memory_format=torch.channels_last)
    sample, step, ctx = inputs
    with torch.inference_mode():
        ref = unet_step(cached, cl, DEV)(sample, step, ctx).float()
    del cached
    err = (out - ref).abs().max().item()
    return {"max_abs_diff": err, "ref_max_abs": ref.abs().max().item(), "relative": err / max(ref.abs().max().item(), 1e-30)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench_sd15_gpu.json")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--slots", type=lambda t: [int(x) for x in t.split(",")], default=[2, 3, 4], help="ring sizes, comma-separated")
    args = ap.parse_args()
    lib = load(args.lib)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    res: dict = {
        "command": "python scripts/bench_sd15_gpu.py",
        "device": props.name,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()},
        "settings": {"batch": args.batch, "height": args.size, "width": args.size, "dtype": "float16", "iters": args.iters},
        "weights": "random: diffusers' init for FP16; codes uniform over the levels, scales at the init's magnitude",
    }
    res["versions"]["python"] = platform.python_version()
    res["bf16_matmul_tflops"] = matmul_tflops()
    print(f"{props.name}: bf16 8192^3 matmul {res['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)

    from diffusers import UNet2DConditionModel

    master = UNet2DConditionModel(**ARCHITECTURES["sd15"].unet).half().eval()  # on the CPU: each configuration copies it
    res["fp16_unet_bytes"] = sum(p.numel() * 2 for p in master.parameters())
    shapes = quantizable_layers({k: tuple(v.shape) for k, v in master.state_dict().items()})
    bits = mixed_bits({k: v for k, v in shapes.items() if k not in EDGE_LAYERS}) | dict.fromkeys(EDGE_LAYERS, EDGE_BITS)
    timesteps = torch.arange(980, -1, -20)  # 50 steps: the table's length, not its values, matters here
    b, h = args.batch, args.size // 8
    g = torch.Generator(device=DEV).manual_seed(0)
    sample = torch.randn(b, 4, h, h, device=DEV, generator=g).half()
    ctx = torch.randn(b, 77, 768, device=DEV, generator=g).half()
    step = torch.zeros(1, dtype=torch.long, device=DEV)
    configs: dict = {}

    # diffusers' UNet, eager
    base = clean()
    unet = copy.deepcopy(master).to(DEV)
    t = torch.tensor(999, device=DEV)
    with torch.inference_mode():
        configs["eager_fp16"] = stats(time_ms(lambda m=unet: m(sample, t, ctx).sample, args.iters))
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            unet(sample, t, ctx)
    configs["eager_fp16"]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
    res["unet_flop_per_step"] = counter.get_total_flops()
    print(f"eager fp16: {configs['eager_fp16']['median_ms']:.2f} ms/step, {res['unet_flop_per_step'] / 1e12:.3f} TFLOP", flush=True)
    del unet, counter

    for cl in (False, True):
        name = "graph_fp16" + ("_channels_last" if cl else "")
        base = clean()
        cached = cache_time_features(copy.deepcopy(master), timesteps).to(DEV)
        if cl:
            cached = cached.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            call = GraphedCall(unet_step(cached, cl, DEV))
            configs[name] = stats(time_ms(lambda call=call: call(sample, step, ctx), args.iters))
        configs[name]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        print(f"{name}: {configs[name]['median_ms']:.2f} ms/step, peak {configs[name]['peak_mem_bytes'] / 1e9:.3f} GB", flush=True)
        del cached, call

    plans = [(False, 3, True)] + [(True, slots, True) for slots in args.slots] + [(True, 3, False)]
    for cl in (False, True):
        packed = random_packed(shapes, bits, cl, seed=1)
        packed_bytes = sum(w.codes.numel() + w.scale.numel() * 4 for w in packed.values())
        checked = False
        for _, slots, group in [p for p in plans if p[0] == cl]:
            name = f"graph_streamed{'_channels_last' if cl else ''}_slots{slots}{'' if group else '_per_layer'}"
            base = clean()
            cached = cache_time_features(copy.deepcopy(master), timesteps)
            model = stream_weights(cached, cached.unet, packed, device=DEV, channels_last=cl, slots=slots, decoder=lib, group=group).to(DEV)
            ring = model.ring
            if cl:
                model = model.to(memory_format=torch.channels_last)
            with torch.inference_mode():
                call = GraphedCall(unet_step(model, cl, DEV))
                configs[name] = stats(time_ms(lambda call=call: call(sample, step, ctx), args.iters))
                out = call(sample, step, ctx).float()
            configs[name]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base + packed_bytes  # codes were there before
            configs[name]["resident_unet_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()) + packed_bytes
            configs[name]["ring_bytes"] = ring.buffer_bytes
            configs[name]["decode_launches"] = len(ring.groups)
            configs[name]["finite_output"] = bool(torch.isfinite(out).all())
            # the decode alone: every group into the ring in order, nothing else
            decode = GraphedCall(lambda x, ring=ring: (ring.decode_all(), x)[1], warmup=1)
            configs[name]["decode_alone"] = stats(time_ms(lambda d=decode: d(step), args.iters))
            print(f"{name}: {configs[name]['median_ms']:.2f} ms/step, peak {configs[name]['peak_mem_bytes'] / 1e9:.3f} GB, "
                  f"ring {ring.buffer_bytes / 1e6:.0f} MB, {len(ring.groups)} decode launches taking "
                  f"{configs[name]['decode_alone']['median_ms']:.3f} ms alone", flush=True)  # fmt: skip
            if not checked:
                inputs = (sample, step, ctx)
                configs[name]["check_vs_decoded"] = check_against_decoded(master, timesteps, packed, cl, lib, out, inputs)
                print(f"  vs the same codes decoded once, eager: {configs[name]['check_vs_decoded']}", flush=True)
                checked = True
            del model, ring, call, cached, decode
        del packed

    # Weights the streamed UNet holds: packed codes and scales of the quantized layers, FP16 for the rest
    # (norms, biases, the time-feature table in place of the time-embedding layers).
    best_fp16 = min(("graph_fp16", "graph_fp16_channels_last"), key=lambda k: configs[k]["median_ms"])
    cl = best_fp16.endswith("channels_last")
    same_layout = [k for k in configs if k.startswith("graph_streamed") and ("channels_last" in k) == cl]
    best = min(same_layout, key=lambda k: configs[k]["median_ms"])
    decode = configs[best]["decode_alone"]
    res.update(
        {
            "configs": configs,
            "baseline_config": best_fp16,
            "streamed_config": best,
            "unet_bytes": configs[best]["resident_unet_bytes"],
            "step_ms": configs[best]["median_ms"],
            "fp16_step_ms": configs[best_fp16]["median_ms"],
            "eager_fp16_step_ms": configs["eager_fp16"]["median_ms"],
            "decode_ms": decode["median_ms"],
            "decode_overhead_ms": configs[best]["median_ms"] - configs[best_fp16]["median_ms"],
            "peak_mem_bytes": configs[best]["peak_mem_bytes"],
            "fp16_peak_mem_bytes": configs[best_fp16]["peak_mem_bytes"],
        }
    )
    res["ratios"] = {
        "size": res["fp16_unet_bytes"] / res["unet_bytes"],
        "step_vs_fp16_graph": res["step_ms"] / res["fp16_step_ms"],
        "step_vs_eager_fp16": res["step_ms"] / res["eager_fp16_step_ms"],
        "peak_mem_vs_fp16": res["peak_mem_bytes"] / res["fp16_peak_mem_bytes"],
        "decode_overhead_share_of_fp16_step": res["decode_overhead_ms"] / res["fp16_step_ms"],
        "decode_alone_share_of_fp16_step": res["decode_ms"] / res["fp16_step_ms"],
        "compute_share_streamed": res["unet_flop_per_step"] / (res["step_ms"] * 1e-3) / (res["bf16_matmul_tflops"] * 1e12),
        "compute_share_fp16_graph": res["unet_flop_per_step"] / (res["fp16_step_ms"] * 1e-3) / (res["bf16_matmul_tflops"] * 1e12),
    }
    res["targets"] = {
        "unet_bytes_at_most_219MB": res["unet_bytes"] <= 219e6,
        "step_at_most_1.05x_fp16": res["ratios"]["step_vs_fp16_graph"] <= 1.05,
        "step_faster_than_eager_fp16": res["step_ms"] < res["eager_fp16_step_ms"],
        "peak_mem_at_most_0.6x_fp16": res["ratios"]["peak_mem_vs_fp16"] <= 0.6,
        "decode_overhead_at_most_5pct": res["ratios"]["decode_overhead_share_of_fp16_step"] <= 0.05,
    }
    print(json.dumps({k: res[k] for k in ("unet_bytes", "step_ms", "fp16_step_ms", "eager_fp16_step_ms", "decode_ms", "peak_mem_bytes",
                                          "fp16_peak_mem_bytes", "ratios", "targets")}, indent=1))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
