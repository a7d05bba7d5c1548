"""Where the fused low-bit kernel's time goes (bf.runtime.lowbit_gemm), on the SD-v1.5 layer shapes that hold most of
the step's weight bytes and one large-M convolution (512x512, batch 2), against cuDNN / cuBLAS on FP16 weights (the
baseline's layer):

  cudnn        F.conv2d (channels-last) or F.linear on FP16 weights, with the bias; the kernels they launch are recorded
  triton-fp16  the fused kernel's implicit GEMM with its decode left out, on the same tiles: FP16 weights [K, N] loaded
               straight into the tiles, split-K as the fused kernel sizes it, its partial sums added by torch (a sum
               and a copy: one launch more than the fused kernel's), no scale or bias
  fused        the fused kernel on codes, each tile configuration of the grid in main()
  wgmma        the TMA kernel on codes (bf.runtime.lowbit_wgmma, Hopper): input boxes and code words by the tensor
               memory accelerator, decoding warps writing FP16 weight tiles to shared memory, asynchronous warp-group
               products (the JSON's ptx num_stages is Triton's launch option, not these tiles' stages)

The JSON's "ptx" reads each compiled variant's PTX: tensor-core groups and their waits, cp.async and tensor memory
accelerator copies, barriers, register reallocation.

Weights are cold in L2 as in a step: one timed CUDA graph runs the layer over enough copies of its weight (codes) to
pass 150 MB, and a call's time is the graph's median replay over the copies. Every configuration's output is checked
against cuDNN's (max |diff| / max |ref|), before and after its timing.

    python benchmarks/lowbit_kernel_ablation.py [--out results/lowbit_kernel_ablation.json] [--quick]
        [--columns triton-fp16,fused,wgmma]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from sd15_layer_paths import fused_search

try:
    import triton
    import triton.language as tl

    from bf.runtime.lowbit_gemm import _accumulate, _input_tile, _tile_offsets, split_k

    jit = triton.jit
except ImportError:  # Triton comes with the GPU extras; --help answers without it

    def jit(**_):
        return lambda fn: fn


REPO = Path(__file__).resolve().parents[1]
COLD_BYTES = 150e6
COLUMNS = ["triton-fp16", "fused", "wgmma"]
# (name, kind, input shape, out channels, kernel, code bits): most of SD-v1.5's weight bytes, and one large-M layer
LAYERS = [
    ("8x8 conv 1280", "conv", (2, 1280, 8, 8), 1280, 3, 2),
    ("8x8 conv 2560", "conv", (2, 2560, 8, 8), 1280, 3, 2),
    ("16x16 conv 1280", "conv", (2, 1280, 16, 16), 1280, 3, 2),
    ("16x16 conv 2560", "conv", (2, 2560, 16, 16), 1280, 3, 2),
    ("16x16 linear 1280", "linear", (2, 256, 1280), 1280, 1, 2),
    ("16x16 linear ff", "linear", (2, 256, 1280), 10240, 1, 2),
    ("8x8 linear 1280", "linear", (2, 64, 1280), 1280, 1, 2),
    ("64x64 conv 320", "conv", (2, 320, 64, 64), 320, 3, 2),
]


@jit(do_not_specialize=["M", "H", "W", "OH", "OW"])
def _fp16_conv_kernel(x_ptr, w_ptr, y_ptr, M, N, C, H, W, OH, OW, ITERS_PER_SPLIT, KH: tl.constexpr, KW: tl.constexpr,
                      PAD: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    # bf.runtime.lowbit_gemm's loop (stride 1, the same tiles, split-K and swapped operands) with the weight tile loaded
    # as FP16 instead of decoded, and no scale or bias; split-K writes fp32 partial sums [split, M, N] that the host adds
    split = tl.program_id(1)
    offs_m, offs_n, img, oy, ox = _tile_offsets(M, N, OH, OW, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < N
    c_iters = tl.cdiv(C, BLOCK_K)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(split * ITERS_PER_SPLIT, tl.minimum((split + 1) * ITERS_PER_SPLIT, KH * KW * c_iters)):
        r, c, a = _input_tile(x_ptr, it, c_iters, img, oy, ox, m_ok, C, H, W, KW, 1, PAD, BLOCK_K)
        k = r * C + c
        wt = tl.load(w_ptr + k[:, None].to(tl.int64) * N + offs_n[None, :], mask=(c < C)[:, None] & n_ok[None, :], other=0.0)
        acc = _accumulate(acc, a, wt, SWAP)
    if SWAP:
        acc = tl.trans(acc)
    out = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLIT:
        tl.store(y_ptr + split.to(tl.int64) * M * N + out, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(y_ptr + out, acc.to(tl.float16), mask=m_ok[:, None] & n_ok[None, :])


def fp16_triton(x, w_kn, kernel, n, cfg):
    """The FP16 ablation on the tile ``cfg`` (a TileConfig; its code-loading fields do not apply): x NHWC
    (channels-last) or [..., C]; w_kn [K, N] with K in (kh, kw, in) order."""
    if x.dim() == 4:
        b, c, h, w = x.shape
        y = torch.empty((b, n, h, w), dtype=torch.float16, device=x.device, memory_format=torch.channels_last)
        m, geom = b * h * w, (h, w, h, w, kernel, kernel, kernel // 2)
    else:
        c = x.shape[-1]
        y = torch.empty((*x.shape[:-1], n), dtype=torch.float16, device=x.device)
        m, geom = x.numel() // c, (1, 1, 1, 1, 1, 1, 0)
    h, w, oh, ow, kh, kw, pad = geom
    bm, bn, bk, warps, stages, splits, swap = cfg.block_m, cfg.block_n, cfg.block_k, cfg.warps, cfg.stages, cfg.splits, cfg.swap
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    per_split, splits = split_k(kh * kw * triton.cdiv(c, bk), tiles, splits, x.device)  # as lowbit_forward sizes it
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    _fp16_conv_kernel[(tiles, splits)](x, w_kn, part, m, n, c, h, w, oh, ow, per_split, KH=kh, KW=kw, PAD=pad,
                                       SPLIT=splits > 1, SWAP=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                       num_warps=warps, num_stages=stages)  # fmt: skip
    if splits > 1:
        y.copy_(part.sum(0).view(y.shape) if x.dim() != 4 else part.sum(0).view(y.shape[0], h, w, n).permute(0, 3, 1, 2))
    return y


def cold_time_us(calls) -> float:
    """Microseconds per call: one CUDA graph over ``calls`` (one per weight copy), median of 5 replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for f in calls:
            f()
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times[1:])


def kernel_names(call) -> list[str]:
    """The GPU kernels one call of ``call`` launches (what cuDNN / cuBLAS picked: their names say how they load tiles)."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def ptx_facts(kernel) -> list[dict]:
    """What each compiled variant of a Triton kernel does, read off its PTX: tensor-core groups (wgmma) and how
    often the loop waits for all of them (wait_group 0), copies into shared memory by cp.async or by the tensor
    memory accelerator (cp.async.bulk.tensor), barriers, and register reallocation between warp groups (setmaxnreg)."""
    facts = []
    for cache in kernel.device_caches.values():
        for ck in cache[0].values():
            ptx = ck.asm.get("ptx", "")
            consts = {kernel.arg_names[k[0]]: v for k, v in getattr(ck.src, "constants", {}).items() if isinstance(k, tuple)}
            facts.append({
                "tile": {k: consts[k] for k in ("KH", "SPLIT", "SWAP", "GATHER", "BLOCK_M", "BLOCK_N", "BLOCK_K") if k in consts},
                "num_warps": ck.metadata.num_warps, "num_stages": ck.metadata.num_stages, "shared_bytes": ck.metadata.shared,
                "wgmma": ptx.count("wgmma.mma_async"), "wgmma_wait_all": ptx.count("wgmma.wait_group.sync.aligned 0;"),
                "wgmma_wait_some": len(re.findall(r"wgmma\.wait_group\.sync\.aligned [1-9]", ptx)),
                "cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)), "tma": ptx.count("cp.async.bulk.tensor"),
                "bar_sync": ptx.count("bar.sync"), "setmaxnreg": ptx.count("setmaxnreg"),
            })  # fmt: skip
    return facts


def timed_column(configs, run, weights, refs) -> dict:
    """Each configuration's cold time over ``weights`` (run(weight, cfg)), its output checked against ``refs`` (the
    first two weights') before and after timing; a tile this GPU cannot hold is recorded as its error."""
    times = {}
    for cfg in configs:
        try:
            d = max(rel_diff(run(weights[i], cfg), refs[i]) for i in (0, 1, 0))
            times[cfg.name] = {"us": cold_time_us([lambda w=w: run(w, cfg) for w in weights]), "rel_diff": d}
            times[cfg.name]["rel_diff_after_timing"] = rel_diff(run(weights[0], cfg), refs[0])
        except Exception as e:
            times[cfg.name] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    return times


def rel_diff(y, ref) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def write(args, rows: list, ptx: dict | None = None) -> None:
    res = {"command": "python benchmarks/lowbit_kernel_ablation.py " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(),
           "versions": {"torch": torch.__version__, "triton": triton.__version__}, "cold_bytes": COLD_BYTES, "layers": rows,
           "ptx": ptx}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(args.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "results" / "lowbit_kernel_ablation.json")
    ap.add_argument("--quick", action="store_true", help="the first three layers and a smaller grid")
    ap.add_argument(
        "--columns",
        type=lambda t: t.split(","),
        default=COLUMNS,
        help=f"which kernels to time besides cuDNN / cuBLAS, comma-separated (default {','.join(COLUMNS)})",
    )
    args = ap.parse_args()
    if set(args.columns) - set(COLUMNS):
        sys.exit(f"--columns takes {', '.join(COLUMNS)}, got {','.join(args.columns)}")
    if "triton" not in globals() or not torch.cuda.is_available():
        sys.exit("lowbit_kernel_ablation.py needs a CUDA GPU and Triton (pip install -e '.[fused]')")
    from bf.runtime.fused_layout import fused_weight
    from bf.runtime.lowbit_gemm import TileConfig, lowbit_forward

    # sd15_layer_paths' search (the runtime's tiles and split-K sized to the GPU, which holds the compiled step's
    # CANDIDATES), levels from bit patterns only; then larger pixel tiles (each decoded weight feeds more products),
    # swapped operands with split-K sized to the GPU, more splits, and per-code word loads
    grid = [c for c in fused_search() if c.magic]
    grid += [
        TileConfig(256, 128, 64, 8, 3, swap=True), TileConfig(256, 128, 64, 8, 3, splits=0, swap=True),
        TileConfig(128, 128, 64, 8, 4, splits=0, swap=True), TileConfig(128, 128, 64, 4, 3, splits=0, swap=True),
        TileConfig(128, 128, 128, 8, 3, splits=8), TileConfig(128, 128, 128, 8, 3, splits=16),
        TileConfig(128, 128, 64, 8, 3, splits=0, swap=True),
        TileConfig(128, 128, 64, 8, 3, swap=True, gather=True), TileConfig(128, 128, 64, 8, 3, splits=0, swap=True, gather=True),
    ]  # fmt: skip
    # the FP16 ablation on every tile of the fused grid (code loading aside), so the two columns are tuned alike
    fp16_grid = list(dict.fromkeys(dataclasses.replace(c, gather=False, magic=True) for c in grid))
    wgmma_grid = []
    if "wgmma" in args.columns:
        from bf.runtime.tma_tiles import CONFIGS as WGMMA_CONFIGS

        # the runtime's tiles with split-K sized to the GPU, then fixed splits
        wgmma_grid = [*WGMMA_CONFIGS, *(dataclasses.replace(c, splits=s) for c in WGMMA_CONFIGS[:3] for s in (1, 2, 4))]
    layers = LAYERS[:3] if args.quick else LAYERS
    dev = "cuda"
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    t0 = time.time()
    for name, kind, xshape, cout, k, bits in layers:
        levels = 3 if bits == 2 else 15
        cin = xshape[1] if kind == "conv" else xshape[-1]
        module = torch.nn.Conv2d(cin, cout, k, 1, k // 2) if kind == "conv" else torch.nn.Linear(cin, cout)
        stored = (cout, k, k, cin) if kind == "conv" else (cout, cin)
        x = torch.randn(xshape, device=dev, generator=gen).half()
        if kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)
        bias = torch.randn(cout, device=dev, generator=gen).half()
        scale = torch.full((cout,), 1 / math.sqrt(cin * k * k), device=dev)
        fp16_bytes = math.prod(stored) * 2
        codes = [torch.randint(0, levels, stored, device=dev, generator=gen).to(torch.uint8) for _ in range(2)]
        fws = [fused_weight(c, scale, module, levels) for c in codes]
        n_fp16 = min(1000, max(2, math.ceil(COLD_BYTES / fp16_bytes)))
        n_fused = min(1000, max(2, math.ceil(COLD_BYTES / fws[0].words.nbytes)))
        fws = [fws[i % 2] if i < 2 else dataclasses.replace(fws[i % 2], words=fws[i % 2].words.clone()) for i in range(n_fused)]
        weights = [((c.float() - levels // 2) * scale.view(-1, *[1] * (c.dim() - 1))).half() for c in codes]
        ref = []
        for w in weights:
            if kind == "conv":
                ref.append(F.conv2d(x, w.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last), bias, 1, k // 2))
            else:
                ref.append(F.linear(x, w, bias))
        w_oihw = [weights[i % 2].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).clone() if kind == "conv"
                  else weights[i % 2].clone() for i in range(n_fp16)]  # fmt: skip
        if kind == "conv":
            cudnn = cold_time_us([lambda w=w: F.conv2d(x, w, bias, 1, k // 2) for w in w_oihw])
        else:
            cudnn = cold_time_us([lambda w=w: F.linear(x, w, bias) for w in w_oihw])
        w = w_oihw[0]
        cudnn_kernels = kernel_names(lambda: F.conv2d(x, w, bias, 1, k // 2) if kind == "conv" else F.linear(x, w, bias))
        del w_oihw
        w_kn = [weights[i % 2].reshape(cout, -1).t().contiguous() for i in range(n_fp16)]
        ref_nobias = [r - (bias.view(-1, 1, 1) if kind == "conv" else bias) for r in ref]
        tri = {}
        if "triton-fp16" in args.columns:
            tri = timed_column(fp16_grid, lambda w, cfg: fp16_triton(x, w, k, cout, cfg), w_kn, ref_nobias)
        del w_kn
        fused = timed_column(grid, lambda fw, cfg: lowbit_forward(x, fw, cfg, bias), fws, ref) if "fused" in args.columns else {}
        wg = {}
        if "wgmma" in args.columns:
            from bf.runtime.lowbit_wgmma import wgmma_forward
            from bf.runtime.tma_tiles import unsupported

            why = {c: unsupported(tuple(x.shape), fws[0], c) for c in wgmma_grid}
            wg = timed_column([c for c in wgmma_grid if not why[c]], lambda fw, cfg: wgmma_forward(x, fw, cfg, bias), fws, ref)
            wg.update({c.name: {"unsupported": why[c]} for c in wgmma_grid if why[c]})
        m = math.prod(xshape) // cin
        flop = 2 * m * cout * cin * k * k
        row = {"layer": name, "kind": kind, "input": list(xshape), "out_channels": cout, "kernel": k, "code_bits": bits,
               "flop": flop, "fp16_weight_bytes": fp16_bytes, "fused_weight_bytes": fws[0].words.nbytes, "copies": [n_fp16, n_fused],
               "cudnn_us": cudnn, "cudnn_kernels": cudnn_kernels}  # fmt: skip
        text = f"{name:18s} M={m:5d} cudnn {cudnn:6.1f} us"
        bad = []
        for column, key, times in (("triton-fp16", "triton_fp16", tri), ("fused", "fused", fused), ("wgmma", "wgmma", wg)):
            if column not in args.columns:
                continue
            ok = {c: v["us"] for c, v in times.items() if "us" in v and v["rel_diff"] < 2e-2 and v["rel_diff_after_timing"] < 2e-2}
            bad += [f"{column} {c}" for c, v in times.items() if "us" in v and c not in ok]
            best = min(ok, key=ok.get) if ok else None
            row |= {f"{key}_us": times, f"{key}_best": best, f"{key}_best_us": ok.get(best)}
            text += f"  {column} {ok[best]:6.1f} ({best}, {flop / ok[best] / 1e6:4.0f} TFLOP/s)" if best else f"  {column} -"
        row["failed_check"] = bad
        rows.append(row)
        print(f"{text}  [{time.time() - t0:.0f} s]", flush=True)
        if bad:
            print(f"    failed the check: {', '.join(bad)}", flush=True)
        write(args, rows)  # after every layer: a run cut short keeps what it measured
    from bf.runtime.lowbit_gemm import _lowbit_conv_kernel

    try:
        ptx = {"fused": ptx_facts(_lowbit_conv_kernel), "triton_fp16": ptx_facts(_fp16_conv_kernel)}
        if "wgmma" in args.columns:
            from bf.runtime.lowbit_wgmma import _wgmma_lowbit_kernel

            ptx["wgmma"] = ptx_facts(_wgmma_lowbit_kernel)
    except (AttributeError, KeyError, TypeError) as e:  # Triton's compiled-kernel cache is not a public interface
        ptx = {"error": f"{type(e).__name__}: {e}"}
    write(args, rows, ptx)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
