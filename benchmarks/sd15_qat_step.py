"""Stage I QAT step of the full-size SD-v1.5 UNet against a plain bf16 fine-tuning step.

The QAT throughput target: on one H100/H200, at 512x512 with the same batch, the
Stage I step (frozen teacher + fake-quantized student, noise and feature distillation)
against a plain fine-tuning step of the same UNet (noise loss only): at most 1.3x the
time and 1.2x the peak memory. Every mode is measured in this one run, with the same
optimizer and clipping as ``bf train`` (AdamW, grad-norm clip 1.0, bf16 autocast,
fp32 master weights). Random weights: the cost does not depend on their values.

Modes:
  plain        student only, noise loss (the baseline)
  distill      + frozen FP teacher and block-feature loss, no fake quant
  qat          + fake-quant on every quantizable layer (1.99-bit-like mix of 1-3 bits), fused
               Triton kernels (bf/trainer/fused_fake_quant.py; what bf train uses on CUDA)
  qat-unfused  qat with the reference fake quant (BF_FUSED_FAKE_QUANT=0)
  qat-ckpt     qat with gradient checkpointing (bf train --grad-checkpoint)
  plain-graph, qat-graph   the whole step (forward, backward, clipping, AdamW) replayed from one
               CUDA graph: no host work per step, so the GPU time of each step is what is timed

    python benchmarks/sd15_qat_step.py --batch 8 --json results/qat_sd15_throughput.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from bf.format import EDGE_BITS, EDGE_LAYERS, Grid, quantizable_layers
from bf.models.architectures import ARCHITECTURES
from bf.provenance import provenance
from bf.trainer.graph_step import GraphedStep
from bf.trainer.qat import LossConfig, attach_fake_quant, stage1_terms
from bf.trainer.train import make_optimizer, optimizer_step

REPO = Path(__file__).resolve().parents[1]
MODES = ("plain", "distill", "qat", "qat-unfused", "qat-ckpt", "plain-graph", "qat-graph")


def build_unet(arch: str, device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**ARCHITECTURES[arch].unet).to(device)


def plan_for(unet) -> dict[str, Grid]:
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    # A fixed 1/2/3-bit mix; the step's cost does not depend on the widths.
    return {m: Grid(EDGE_BITS if m in EDGE_LAYERS else 1 + i % 3) for i, m in enumerate(quantizable_layers(shapes))}


def run_mode(mode: str, arch: str, batch: int, res: int, steps: int, warmup: int, device, profile: bool = False) -> dict:
    cuda = device.type == "cuda"
    os.environ["BF_FUSED_FAKE_QUANT"] = "0" if mode == "qat-unfused" else "1"
    graphed = mode.endswith("-graph")
    mode_base = mode.removesuffix("-graph")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    student = build_unet(arch, device).train()
    teacher = None
    if mode_base != "plain":
        teacher = build_unet(arch, device).eval().requires_grad_(False)
    t0 = time.time()
    if mode_base.startswith("qat"):
        attach_fake_quant(student, plan_for(student), init="minmax")
    setup_s = time.time() - t0
    if mode_base == "qat-ckpt":
        student.enable_gradient_checkpointing()
    opt = make_optimizer(student, lr=1e-5)
    g = torch.Generator(device=device).manual_seed(0)
    lat = res // 8
    zt = torch.randn(batch, 4, lat, lat, device=device, generator=g)
    noise = torch.randn(batch, 4, lat, lat, device=device, generator=g)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    cond = torch.randn(batch, 77, student.config.cross_attention_dim, device=device, generator=g)
    loss_cfg = LossConfig()

    def loss_of(zt, t, cond, noise):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if teacher is None:
                return F.mse_loss(student(zt, t, cond).sample.float(), noise)
            return stage1_terms(student, teacher, zt, t, cond, loss_cfg)[0]

    graph = None
    if graphed:  # the same capture as bf train --cuda-graph
        graph = GraphedStep(lambda *b: (loss_of(*b),), opt, optimizer_step, (zt, t, cond, noise))
    times = []
    prof = None
    for i in range(warmup + steps):
        if profile and i == warmup:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t_step = time.perf_counter()
        if graph is not None:
            graph(zt, t, cond, noise)
        else:
            optimizer_step(loss_of(zt, t, cond, noise), opt)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) if cuda else 1e3 * (time.perf_counter() - t_step))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    if prof is not None:  # where a step's time goes: GPU kernels, and the host work that issues them
        prof.__exit__(None, None, None)
        table = prof.key_averages()
        print(f"--- {mode}: top GPU time ({steps} steps)")
        print(table.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(f"--- {mode}: top host time")
        print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    student = teacher = opt = graph = None  # frees the models before the next mode (the closure shares these cells)
    return {
        "mode": mode,
        "step_ms": statistics.median(times),
        "step_ms_all": times,
        "peak_mem_bytes": peak,
        "fake_quant_setup_s": round(setup_s, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", help="sd15, or sd15-tiny for a smoke test (runs on CPU too)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="Timed steps per mode (median reported).")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", type=Path, default=REPO / "results" / "qat_sd15_throughput.json")
    p.add_argument("--profile", action="store_true", help="Print torch.profiler tables of each mode's timed steps.")
    args = p.parse_args()
    if not torch.cuda.is_available() and args.arch == "sd15":
        raise SystemExit("this benchmark needs a CUDA GPU (or --arch sd15-tiny for a smoke test)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = {}
    for mode in args.modes.split(","):
        r = run_mode(mode, args.arch, args.batch, args.res, args.steps, args.warmup, device, args.profile)
        results[mode] = r
        print(f"{mode:9s} {r['step_ms']:8.1f} ms/step  peak {r['peak_mem_bytes'] / 2**30:6.2f} GiB", flush=True)
    base = results.get("plain")
    ratios = {}
    if base:
        for mode, r in results.items():
            mem = r["peak_mem_bytes"] / base["peak_mem_bytes"] if base["peak_mem_bytes"] else None
            ratios[mode] = {"time_vs_plain": r["step_ms"] / base["step_ms"], "memory_vs_plain": mem}
    if "plain-graph" in results and "qat-graph" in results:
        pg = results["plain-graph"]
        ratios["qat-graph_vs_plain-graph"] = {
            "time": results["qat-graph"]["step_ms"] / pg["step_ms"],
            "memory": results["qat-graph"]["peak_mem_bytes"] / pg["peak_mem_bytes"] if pg["peak_mem_bytes"] else None,
        }
    if "distill" in results and "qat" in results:
        distill_mem = results["distill"]["peak_mem_bytes"]
        ratios["qat_vs_distill"] = {
            "time": results["qat"]["step_ms"] / results["distill"]["step_ms"],
            "memory": results["qat"]["peak_mem_bytes"] / distill_mem if distill_mem else None,
        }
    for k, v in ratios.items():
        print(f"{k:14s} " + "  ".join(f"{a} {b:.3f}x" for a, b in v.items() if b is not None))
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "batch": args.batch,
        "resolution": args.res,
        "autocast": "bf16, fp32 master weights, AdamW, grad-norm clip 1.0",
        "results": results,
        "ratios": ratios,
        "targets": {"time_vs_plain": 1.3, "memory_vs_plain": 1.2},
        "versions": provenance(),
        # every option, defaults included: the command repeats this run even if a default changes
        "command": "python benchmarks/sd15_qat_step.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v and v is not True),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
