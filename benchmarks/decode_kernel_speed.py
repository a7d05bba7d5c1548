"""Speed of plugins_trt's decode kernels on a GPU, against the copy bandwidth measured in the same run.

1. Copy bandwidth: a 2 GiB device-to-device copy (bytes read + written per second).
2. Per width and grid: 16 distinct 1280x1280x3x3 layers (the largest SD-v1.5 conv; 472 MB of
   fp16 output in all, several times the L2) decoded back to back, one launch each, replayed
   from a CUDA graph (so host launch cost is not timed); bytes read (codes, scales)
   plus written, per second, as a share of the copy bandwidth. Target: >= 70%.
3. Whole UNet: every quantized weight of the full-size SD-v1.5 UNet at the 1.99-bit mix of
   tools/sd15_mix.py (conv_in/conv_out at 8 bits), decoded to fp16, one launch per weight (as
   TensorRT runs the plugin) and batched (bf_decode_cuda_batch, the PyTorch runtime's path), eager
   and replayed from a CUDA graph; against its floor = bytes / copy bandwidth. Target: <= 1.4x.

    python benchmarks/decode_kernel_speed.py [--lib plugins_trt/build/libbf_decode.so] [--out results/decode_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from bf.decode_kernels import DecodeLibrary, load
from bf.format import quantizable_layers
from bf.format.dequant_op import DequantSpec
from bf.format.grid import Grid
from bf.format.unet_layers import EDGE_BITS, EDGE_LAYERS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_time_ms(n: int) -> float:
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    return time_ms(lambda: dst.copy_(src))


def captured(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def random_weights(specs: list[DequantSpec], seed: int):
    """Valid random packed codes (any byte pattern is not: a field must stay below L^K) and scales on the GPU."""
    from bf.format.packing import pack_codes

    rng = np.random.default_rng(seed)
    out = []
    cache = {}
    for spec in specs:
        key = (spec.shape, spec.grid)
        if key not in cache:  # packing on the CPU is the slow part; equal shapes share codes
            cache[key] = pack_codes(rng.integers(0, spec.grid.levels, spec.shape, dtype=np.int32), spec.packing)
        codes = torch.from_numpy(cache[key]).cuda()
        scale = torch.rand(spec.shape[0], device="cuda") * 0.01 + 1e-3
        out.append((codes, scale, torch.empty(spec.shape, dtype=torch.float16, device="cuda")))
    return out


def decode_all(lib: DecodeLibrary, specs, bufs) -> None:
    for spec, (codes, scale, w) in zip(specs, bufs, strict=True):
        lib.decode_cuda(codes, scale, spec, out=w)


def moved_bytes(bufs) -> int:
    return sum(c.numel() + s.numel() * 4 + w.numel() * 2 for (c, s, w) in bufs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "decode_gpu.json")
    args = ap.parse_args()
    from sd15_mix import mixed_bits, sd15_unet_shapes

    lib = load(args.lib)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)

    n = 1 << 31
    copy_gbs = 2 * n / copy_time_ms(n) / 1e6
    print(f"{props.name}: device-to-device copy {copy_gbs:.0f} GB/s (read + written)")

    widths = []
    for kind in ("balanced", "plain"):
        for bits in range(1, 9):
            specs = [DequantSpec((1280, 1280, 3, 3), Grid(bits, kind))] * 16
            bufs = random_weights(specs, bits)
            # Replayed from a CUDA graph: eager, the ctypes call (~20 us) would be timed, not the kernel.
            ms = time_ms(captured(lambda specs=specs, bufs=bufs: decode_all(lib, specs, bufs)).replay, iters=10)
            gbs = moved_bytes(bufs) / ms / 1e6
            widths.append({"grid": kind, "bits": bits, "ms_per_layer": ms / 16, "gb_per_s": gbs, "share_of_copy": gbs / copy_gbs})
            print(f"  {kind:8s} {bits} bits: {ms / 16 * 1e3:7.1f} us/layer  {gbs:6.0f} GB/s  {100 * gbs / copy_gbs:5.1f}% of copy")
            del bufs

    shapes = quantizable_layers(sd15_unet_shapes())
    bits = mixed_bits({k: v for k, v in shapes.items() if k not in EDGE_LAYERS}) | dict.fromkeys(EDGE_LAYERS, EDGE_BITS)
    specs = [DequantSpec(shape, Grid(bits[name])) for name, shape in shapes.items()]
    bufs = random_weights(specs, 99)
    total = moved_bytes(bufs)
    floor_ms = total / (copy_gbs * 1e6)
    eager_ms = time_ms(lambda: decode_all(lib, specs, bufs), iters=10)
    graph_ms = time_ms(captured(lambda: decode_all(lib, specs, bufs)).replay, iters=20)
    weights, outs = [(c, s, spec) for spec, (c, s, _) in zip(specs, bufs, strict=True)], [w for (_, _, w) in bufs]
    batch_ms = time_ms(lambda: lib.decode_cuda_batch(weights, outs), iters=20)
    batch_graph_ms = time_ms(captured(lambda: lib.decode_cuda_batch(weights, outs)).replay, iters=20)
    values = sum(math.prod(s.shape) for s in specs)
    print(
        f"whole SD-v1.5 UNet: {len(specs)} weights, {values / 1e6:.1f} M values, {total / 1e9:.3f} GB moved; floor {floor_ms:.3f} ms\n"
        f"  one launch per weight: eager {eager_ms:.3f} ms, CUDA graph {graph_ms:.3f} ms = {graph_ms / floor_ms:.2f}x floor\n"
        f"  batched (bf_decode_cuda_batch): eager {batch_ms:.3f} ms, "
        f"CUDA graph {batch_graph_ms:.3f} ms = {batch_graph_ms / floor_ms:.2f}x floor"
    )
    large = [w for w in widths if w["grid"] == "balanced" and w["bits"] <= 4]
    result = {
        "command": "python benchmarks/decode_kernel_speed.py " + " ".join(sys.argv[1:]),
        "gpu": props.name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "copy_gb_per_s": copy_gbs,
        "large_layer": {"shape": [1280, 1280, 3, 3], "layers_per_run": 16, "output": "float16", "widths": widths},
        "large_layer_min_share_balanced_1_to_4_bits": min(w["share_of_copy"] for w in large),
        "target_share": 0.70,
        "whole_unet": {
            "weights": len(specs),
            "values": values,
            "bytes_moved": total,
            "floor_ms": floor_ms,
            "eager_ms": eager_ms,
            "cuda_graph_ms": graph_ms,
            "cuda_graph_over_floor": graph_ms / floor_ms,
            "batched_eager_ms": batch_ms,
            "batched_cuda_graph_ms": batch_graph_ms,
            "batched_cuda_graph_over_floor": batch_graph_ms / floor_ms,
            "target_over_floor": 1.4,
            "bits": {str(b): sum(1 for s in specs if s.grid.bits == b) for b in sorted({s.grid.bits for s in specs})},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
