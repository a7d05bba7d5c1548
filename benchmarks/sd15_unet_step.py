"""The full-size SD-v1.5 UNet at the 1.99-bit mix against FP16, on one GPU.

Random weights (speed and memory do not depend on the values), 512x512, batch 2 (one image
with classifier-free guidance), fp16. Every configuration is measured in this one run:

  eager_fp16       diffusers' UNet2DConditionModel in eager mode (the usual way to run it)
  graph_fp16       the torch backend's UNet (bf.runtime.backend_torch.TorchUNet: time-feature
                   table, by step index) with FP16 weights, its step replayed from a CUDA
                   graph; NCHW and channels-last
  graph_streamed   the same UNet with the 1.99-bit packed codes resident and every weight
                   decoded just before its layer into a ring of reused buffers, on a side
                   stream overlapping compute (bf.runtime.streamed_weights), CUDA graph
  ..._fused_auto   the same, but each layer whose codes the fused low-bit kernel (Triton,
                   bf.runtime.lowbit_gemm) runs faster than decode + cuDNN/cuBLAS takes that
                   kernel instead (chosen per layer by timing both in the first forward);
                   _fused_on: every layer the kernel can run takes it

plus the decode alone (the ring's launches in order, nothing else), the
bf16 matrix-product rate of this GPU and the UNet's operation count. Peak memory is what a
configuration allocates on top of an empty GPU (weights, codes, ring, graph pool). Writes
results/bench_sd15_gpu.json.

    python benchmarks/sd15_unet_step.py [--lib libbf_decode.so] [--out results/bench_sd15_gpu.json] [--fused off,auto,on]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bf.decode_kernels import load
from bf.format import quantizable_layers
from bf.format.dequant_op import DequantSpec
from bf.format.grid import Grid
from bf.format.packing import pack_codes
from bf.format.unet_layers import EDGE_BITS, EDGE_LAYERS
from bf.models.architectures import ARCHITECTURES
from bf.runtime.backend_torch import TorchUNet
from bf.runtime.streamed_weights import PackedWeight
from bf.runtime.torch_graph import GraphedCall, cuda_time_ms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
DEV = "cuda"


@dataclass(frozen=True)
class Plan:
    """One streamed configuration: layout, ring slots, grouped decode, fused mode, MB kept decoded,
    decode stream priority and decode grid cap."""

    channels_last: bool
    slots: int
    group: bool = True
    fused: str = "off"
    keep_mb: int = 0
    priority: int = 0
    blocks: int = 0

    @property
    def name(self) -> str:
        """The configuration's key in the JSON (the names earlier runs used)."""
        name = f"graph_streamed{'_channels_last' if self.channels_last else ''}_slots{self.slots}{'' if self.group else '_per_layer'}"
        name += "" if self.fused == "off" else f"_fused_{self.fused}"
        name += f"_keep{self.keep_mb}MB" if self.keep_mb else ""
        name += "_high_priority" if self.priority else ""
        return name + (f"_blocks{self.blocks}" if self.blocks else "")


def run_record(script: str, args) -> dict:
    """The start of a GPU run's JSON: the command, device, versions and settings (cuDNN autotuning on, seeded)."""
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    return {
        "command": " ".join(["python", script, *sys.argv[1:]]),
        "device": torch.cuda.get_device_properties(0).name,
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(),
        },
        "settings": {"batch": args.batch, "height": args.size, "width": args.size, "dtype": "float16", "iters": args.iters},
        "weights": "random: diffusers' init for FP16; codes uniform over the levels, scales at the init's magnitude",
    }


def stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "iters": len(times)}


def clean() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def write_floor_ms(n: int = 860_000_000) -> dict:
    """What writing the quantized layers' FP16 weights (about n values) costs at best: a fill, and a copy."""
    buf, src = torch.empty(n, dtype=torch.float16, device=DEV), torch.ones(n, dtype=torch.float16, device=DEV)
    return {
        "fp16_weights_fill_ms": statistics.median(cuda_time_ms(lambda: buf.fill_(1.0), 20, 3)),
        "fp16_weights_copy_ms": statistics.median(cuda_time_ms(lambda: buf.copy_(src), 20, 3)),
    }


def matmul_tflops(dtype=torch.bfloat16, n: int = 8192) -> float:
    a, b = torch.randn(n, n, device=DEV, dtype=dtype), torch.randn(n, n, device=DEV, dtype=dtype)
    ms = statistics.median(cuda_time_ms(lambda: a @ b, 20, 5))
    return 2 * n**3 / ms / 1e9


def sd15_mixed_unet():
    """SD-v1.5's UNet with random weights in fp16 on the CPU (each configuration copies it), its quantizable layers'
    weight shapes, and the 1.99-bit mix's bits for each (tools/sd15_mix; the edge layers at EDGE_BITS)."""
    from diffusers import UNet2DConditionModel
    from sd15_mix import mixed_bits

    master = UNet2DConditionModel(**ARCHITECTURES["sd15"].unet).half().eval()
    shapes = quantizable_layers({k: tuple(v.shape) for k, v in master.state_dict().items()})
    bits = mixed_bits({k: v for k, v in shapes.items() if k not in EDGE_LAYERS}) | dict.fromkeys(EDGE_LAYERS, EDGE_BITS)
    return master, shapes, bits


def random_packed(shapes: dict, bits: dict, channels_last: bool, seed: int, device: str = DEV) -> dict[str, PackedWeight]:
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
        scale = torch.full((shape[0],), 1.0 / math.sqrt(fan_in) / grid.qmax, device=device)
        out[name] = PackedWeight(torch.from_numpy(cache[key]).to(device), scale, spec, cl)
    return out


def check_against_decoded(master, timesteps, packed: dict, cl: bool, lib, out: torch.Tensor, inputs) -> dict:
    """The streamed, graphed step against the same codes decoded once into FP16 weights, run eagerly."""
    decoded = TorchUNet(copy.deepcopy(master), timesteps, packed, weights="decoded", device=DEV, channels_last=cl, cuda_graph=False,
                        decoder=lib)  # fmt: skip
    sample, step, ctx = inputs
    with torch.inference_mode():
        ref = decoded.step(sample, step, ctx).float()
    del decoded
    err = (out - ref).abs().max().item()
    return {"max_abs_diff": err, "ref_max_abs": ref.abs().max().item(), "relative": err / max(ref.abs().max().item(), 1e-30)}


def fused_choices(unet: TorchUNet, bits: dict) -> list[dict]:
    """What each streamed layer's first forward measured and chose (ms per call)."""
    return [
        {"layer": name, "bits": bits.get(name), "input": list(m.chosen_for), "choice": m.config.name if m.config else "decode+op",
         "timings_ms": m.timings}
        for name, m in unet.streamed_layers().items()
        if m.timings
    ]  # fmt: skip


def layer_sums(layers: list[dict]) -> dict:
    """Per-layer timings of fused_choices summed: decode + op everywhere, the best fused tile everywhere, and what was chosen."""
    sums = {"decode+op": 0.0, "fused": 0.0, "chosen": 0.0}
    for layer in layers:
        t = layer["timings_ms"]
        best_fused = min(v for k, v in t.items() if k != "decode+op")
        sums["fused"] += best_fused
        sums["decode+op"] += t.get("decode+op", float("nan"))
        sums["chosen"] += t.get(layer["choice"], best_fused)
    return sums


def summarize(res: dict) -> None:
    """The headline figures, ratios and targets from ``res["configs"]`` (in place)."""
    configs = res["configs"]
    # The packed UNet: codes and scales of the quantized layers, FP16 for the rest (norms, biases, the
    # time-feature table in place of the time-embedding layers), as purely streamed configurations hold it.
    # The headline configuration is the fastest whose peak memory meets the 0.6x target (it may keep
    # some weights decoded); the fastest purely streamed one is reported beside it.
    best_fp16 = min([k for k in ("graph_fp16", "graph_fp16_channels_last") if k in configs], key=lambda k: configs[k]["median_ms"])
    cl = best_fp16.endswith("channels_last")
    fp16_peak = configs[best_fp16]["peak_mem_bytes"]
    same_layout = [k for k in configs if k.startswith("graph_streamed") and ("channels_last" in k) == cl]
    pure = min([k for k in same_layout if not configs[k]["kept_decoded_bytes"] and not configs[k]["fused_layers"]],
               key=lambda k: configs[k]["median_ms"])  # fmt: skip
    best = min(
        [k for k in same_layout if configs[k]["peak_mem_bytes"] <= 0.6 * fp16_peak] or same_layout, key=lambda k: configs[k]["median_ms"]
    )
    decode = configs[best]["decode_alone"]
    res.update(
        {
            "baseline_config": best_fp16,
            "streamed_config": best,
            "unet_bytes": configs[pure]["resident_unet_bytes"],
            "resident_unet_bytes": configs[best]["resident_unet_bytes"],
            "step_ms": configs[best]["median_ms"],
            "fp16_step_ms": configs[best_fp16]["median_ms"],
            "eager_fp16_step_ms": configs["eager_fp16"]["median_ms"],
            "decode_ms": decode["median_ms"],
            "decode_overhead_ms": configs[best]["median_ms"] - configs[best_fp16]["median_ms"],
            "peak_mem_bytes": configs[best]["peak_mem_bytes"],
            "fp16_peak_mem_bytes": fp16_peak,
            "pure_streamed": {
                "config": pure,
                "step_ms": configs[pure]["median_ms"],
                "step_vs_fp16_graph": configs[pure]["median_ms"] / configs[best_fp16]["median_ms"],
                "decode_overhead_share_of_fp16_step": (configs[pure]["median_ms"] - configs[best_fp16]["median_ms"])
                / configs[best_fp16]["median_ms"],
                "peak_mem_vs_fp16": configs[pure]["peak_mem_bytes"] / fp16_peak,
            },
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


def estimate_undercounted_peaks(res: dict) -> None:
    """For a JSON written before the script freed each configuration before the next one's
    baseline: every streamed configuration after the run's first had the previous model's
    memory inside its baseline, so its peak was undercounted. Its peak becomes its resident
    weights + ring + the activations and workspace the run's first streamed configuration
    measured (the larger of that and what was measured), and says so."""
    configs = res["configs"]
    streamed = [k for k in configs if k.startswith("graph_streamed")]
    first = configs[streamed[0]]
    act = first["peak_mem_bytes"] - first["resident_unet_bytes"] - first["ring_bytes"]
    for k in streamed[1:]:
        c = configs[k]
        measured = c.setdefault("peak_mem_bytes_measured", c["peak_mem_bytes"])
        estimate = c["resident_unet_bytes"] + c["ring_bytes"] + act
        c["peak_mem_bytes"] = max(measured, estimate)
        if estimate > measured:
            c["peak_mem_source"] = (f"estimate: resident weights + ring + {act} bytes of activations and workspace measured by "
                                    f"{streamed[0]}; the measured peak was undercounted (the previous model was allocated)")  # fmt: skip
        else:
            c["peak_mem_source"] = "measured, a lower bound: the previous model was allocated during the measurement"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench_sd15_gpu.json")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--slots", type=lambda t: [int(x) for x in t.split(",")], default=[2, 3, 4], help="ring sizes, comma-separated")
    ap.add_argument("--fused", type=lambda t: t.split(","), default=["auto", "on"], help="fused modes beside off (2 slots, channels-last)")
    ap.add_argument("--no-nchw", action="store_true", help="skip the NCHW configurations")
    ap.add_argument("--decode-blocks", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                    help="caps on the decode grids, comma-separated: a configuration each, pure and with the largest --keep")  # fmt: skip
    ap.add_argument("--keep", type=lambda t: [(int(x.split(":")[0]), int((x + ":2").split(":")[1])) for x in t.split(",") if x],
                    default=[(256, 2), (512, 2), (640, 2)],
                    help="MB of the largest weights kept decoded (memory for speed)[:slots], comma-separated")  # fmt: skip
    ap.add_argument("--resummarize", type=Path, default=None, metavar="JSON",
                    help="recompute the summary of a JSON this script wrote (no GPU), fixing undercounted peaks of older runs")  # fmt: skip
    args = ap.parse_args()

    if args.resummarize:
        res = json.loads(args.resummarize.read_text())
        if not res.get("peaks_measured_clean"):
            estimate_undercounted_peaks(res)
        summarize(res)
        res["resummarized"] = "python benchmarks/sd15_unet_step.py --resummarize " + str(args.resummarize)
        args.resummarize.write_text(json.dumps(res, indent=1) + "\n")
        keys = ("streamed_config", "step_ms", "fp16_step_ms", "peak_mem_bytes", "ratios", "targets", "pure_streamed")
        print(json.dumps({k: res[k] for k in keys}, indent=1))
        return
    lib = load(args.lib)
    res = run_record("benchmarks/sd15_unet_step.py", args)
    res["bf16_matmul_tflops"] = matmul_tflops()
    print(f"{res['device']}: bf16 8192^3 matmul {res['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)

    res |= write_floor_ms()
    print(f"fp16 weights' bytes: fill {res['fp16_weights_fill_ms']:.3f} ms, copy {res['fp16_weights_copy_ms']:.3f} ms", flush=True)

    master, shapes, bits = sd15_mixed_unet()
    res["fp16_unet_bytes"] = sum(p.numel() * 2 for p in master.parameters())
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
        configs["eager_fp16"] = stats(cuda_time_ms(lambda m=unet: m(sample, t, ctx).sample, args.iters, 3))
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            unet(sample, t, ctx)
    configs["eager_fp16"]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
    res["unet_flop_per_step"] = counter.get_total_flops()
    print(f"eager fp16: {configs['eager_fp16']['median_ms']:.2f} ms/step, {res['unet_flop_per_step'] / 1e12:.3f} TFLOP", flush=True)
    del unet, counter

    layouts = (True,) if args.no_nchw else (False, True)
    for cl in layouts:
        name = "graph_fp16" + ("_channels_last" if cl else "")
        base = clean()
        fp16 = TorchUNet(copy.deepcopy(master), timesteps, weights="fp", device=DEV, channels_last=cl)
        with torch.inference_mode():
            configs[name] = stats(cuda_time_ms(lambda u=fp16: u.step(sample, step, ctx), args.iters, 3))
        configs[name]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        print(f"{name}: {configs[name]['median_ms']:.2f} ms/step, peak {configs[name]['peak_mem_bytes'] / 1e9:.3f} GB", flush=True)
        del fp16

    plans = [Plan(False, 3)] + [Plan(True, slots) for slots in args.slots]
    plans += [Plan(True, 3, group=False)] + [Plan(True, 2, fused=mode) for mode in args.fused if mode != "off"]
    plans += [Plan(True, 2, priority=-1)] + [Plan(True, slots, keep_mb=mb) for mb, slots in args.keep]
    plans += [
        Plan(True, 2, keep_mb=mb, blocks=blocks) for blocks in args.decode_blocks for mb in (0, *sorted({mb for mb, _ in args.keep})[-1:])
    ]
    for cl in layouts:
        packed = random_packed(shapes, bits, cl, seed=1)
        checked = False
        for plan in [p for p in plans if p.channels_last == cl]:
            name, fused, keep_mb = plan.name, plan.fused, plan.keep_mb
            base = clean()
            model = TorchUNet(copy.deepcopy(master), timesteps, packed, device=DEV, channels_last=cl, slots=plan.slots, fused=fused,
                              keep_decoded_bytes=keep_mb * 2**20, decoder=lib, group=plan.group, priority=plan.priority,
                              decode_blocks=plan.blocks)  # fmt: skip
            if model.fused != fused:  # the backend turns the fused kernel off where it cannot run (no Triton)
                raise SystemExit(f"{name}: the fused low-bit kernel cannot run here (fused={model.fused!r})")
            ring = model.ring
            with torch.inference_mode():
                if fused != "off":  # the first forward picks each layer's kernel: keep its timing runs out of the peak
                    model.eager_step(sample, step, ctx)
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    after_first = torch.cuda.memory_allocated() - base
                    layers = fused_choices(model, bits)
                    configs[name] = {"layers": layers, "mem_after_first_forward": after_first, "layer_sums_ms": layer_sums(layers)}
                    print(f"  per-layer sums (isolated, ms): {configs[name]['layer_sums_ms']}", flush=True)
                configs[name] = stats(cuda_time_ms(lambda m=model: m.step(sample, step, ctx), args.iters, 3)) | configs.get(name, {})
                out = model.step(sample, step, ctx).float()
            # the codes were allocated before `base`; fused layers hold their words instead (allocated after, so counted)
            configs[name]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base + ring.packed_bytes
            resident = sum(p.numel() * p.element_size() for p in model.module.parameters()) + model.weight_bytes
            configs[name]["resident_unet_bytes"] = resident
            configs[name]["fused_layers"] = model.fused_layers
            configs[name]["kept_decoded_bytes"] = model.kept_decoded_bytes
            configs[name]["ring_bytes"] = ring.buffer_bytes
            configs[name]["decode_launches"] = len(ring.groups)
            configs[name]["finite_output"] = bool(torch.isfinite(out).all())
            # the decode alone: every group into the ring in order, nothing else
            decode = GraphedCall(lambda x, ring=ring: (ring.decode_all(), x)[1], warmup=1)
            configs[name]["decode_alone"] = stats(cuda_time_ms(lambda d=decode: d(step), args.iters, 3))
            print(f"{name}: {configs[name]['median_ms']:.2f} ms/step, peak {configs[name]['peak_mem_bytes'] / 1e9:.3f} GB, "
                  f"{configs[name]['fused_layers']} fused layers, "
                  f"ring {ring.buffer_bytes / 1e6:.0f} MB, {len(ring.groups)} decode launches taking "
                  f"{configs[name]['decode_alone']['median_ms']:.3f} ms alone", flush=True)  # fmt: skip
            if not checked or fused != "off" or keep_mb:
                inputs = (sample, step, ctx)
                configs[name]["check_vs_decoded"] = check_against_decoded(master, timesteps, packed, cl, lib, out, inputs)
                print(f"  vs the same codes decoded once, eager: {configs[name]['check_vs_decoded']}", flush=True)
                checked = True
            del model, ring, decode, out  # keep none of this configuration in the next baseline
        del packed

    res["configs"] = configs
    res["peaks_measured_clean"] = True
    summarize(res)
    print(json.dumps({k: res[k] for k in ("unet_bytes", "step_ms", "fp16_step_ms", "eager_fp16_step_ms", "decode_ms", "peak_mem_bytes",
                                          "fp16_peak_mem_bytes", "ratios", "targets")}, indent=1))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
