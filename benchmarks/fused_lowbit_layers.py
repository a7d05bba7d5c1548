"""The fused low-bit kernel (bf.runtime.lowbit_gemm) layer by layer, on SD-v1.5's layer shapes at
512x512, batch 2, against what the streamed UNet does instead (decode into a buffer, then cuDNN /
cuBLAS) and against the FP16 layer alone (the baseline's cost of that layer).

Every tile configuration in the grid of main() is tried with both code-loading schemes; each time is
one call's share of a CUDA graph of 10 back-to-back calls (median of 5 replays). Writes
results/fused_layers_gpu.json.

    python benchmarks/fused_lowbit_layers.py [--lib libbf_decode.so] [--out results/fused_layers_gpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from bf.decode_kernels import load
from bf.format.dequant_op import DequantSpec
from bf.format.grid import Grid
from bf.format.packing import pack_codes
from bf.runtime.fused_layout import fused_weight
from bf.runtime.torch_graph import graph_time_ms

REPO = Path(__file__).resolve().parents[1]
# (name, kind, input shape, out channels, kernel, stride, bits): the shapes that hold SD-v1.5's weights and time
LAYERS = [
    ("down3.resnet.conv", "conv", (2, 1280, 8, 8), 1280, 3, 1, 1),
    ("down2.resnet.conv", "conv", (2, 1280, 16, 16), 1280, 3, 1, 1),
    ("up1.resnet.conv1", "conv", (2, 2560, 16, 16), 1280, 3, 1, 1),
    ("down1.resnet.conv", "conv", (2, 640, 32, 32), 640, 3, 1, 1),
    ("down0.resnet.conv", "conv", (2, 320, 64, 64), 320, 3, 1, 1),
    ("down2.attn.to_q", "linear", (2, 256, 1280), 1280, 1, 1, 1),
    ("down2.ff.geglu", "linear", (2, 256, 1280), 10240, 1, 1, 1),
    ("down2.ff.out", "linear", (2, 256, 5120), 1280, 1, 1, 1),
    ("mid.attn.to_q", "linear", (2, 64, 1280), 1280, 1, 1, 1),
    ("down1.attn.to_q", "linear", (2, 1024, 640), 640, 1, 1, 1),
    ("down0.attn.to_q", "linear", (2, 4096, 320), 320, 1, 1, 1),
    ("down2.resnet.conv 2-bit", "conv", (2, 1280, 16, 16), 1280, 3, 1, 2),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "fused_layers_gpu.json")
    args = ap.parse_args()
    from bf.runtime.lowbit_gemm import CONFIGS, TileConfig, lowbit_forward  # Triton: imported once the arguments are read

    grid = [  # the runtime's configurations, and larger K tiles
        *CONFIGS,
        TileConfig(128, 128, 128, 8, 3),
        TileConfig(64, 128, 128, 4, 3),
        TileConfig(64, 128, 128, 4, 3, splits=4),
        TileConfig(64, 128, 128, 4, 3, splits=8),
    ]
    lib = load(args.lib)
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    grid = [dataclasses.replace(c, gather=g) for c in grid for g in (False, True)]
    rows = []
    for name, kind, xshape, cout, k, stride, bits in LAYERS:
        g = Grid(bits)
        cin = xshape[1] if kind == "conv" else xshape[-1]
        module = torch.nn.Conv2d(cin, cout, k, stride, k // 2) if kind == "conv" else torch.nn.Linear(cin, cout)
        stored = (cout, k, k, cin) if kind == "conv" else (cout, cin)
        codes = torch.randint(0, g.levels, stored, device=dev, generator=gen).to(torch.uint8)
        scale = torch.full((cout,), 1 / math.sqrt(cin * k * k), device=dev)
        bias = torch.randn(cout, device=dev, generator=gen).half()
        spec = DequantSpec(stored, g)
        packed = torch.from_numpy(pack_codes(codes.cpu().numpy(), spec.packing)).to(dev)
        x = torch.randn(xshape, device=dev, generator=gen).half()
        buf = torch.empty(stored, device=dev, dtype=torch.float16)
        if kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)

            def op(w, x=x, stride=stride, k=k, bias=bias):
                return F.conv2d(x, w.permute(0, 3, 1, 2), bias, stride, k // 2)
        else:

            def op(w, x=x, bias=bias):
                return F.linear(x, w, bias)

        lib.decode_cuda(packed, scale, spec, out=buf)
        fp16 = graph_time_ms(lambda op=op, buf=buf: op(buf))
        decode = graph_time_ms(lambda buf=buf, packed=packed, scale=scale, spec=spec: lib.decode_cuda(packed, scale, spec, out=buf))
        fw = fused_weight(codes, scale, module, g.levels)
        fused = {}
        for cfg in grid:
            try:
                fused[cfg.name] = graph_time_ms(lambda cfg=cfg, x=x, fw=fw, bias=bias: lowbit_forward(x, fw, cfg, bias))
            except Exception as e:  # a tile this GPU cannot hold is a result, not a failure
                fused[cfg.name] = f"{type(e).__name__}"
        ok = {c: t for c, t in fused.items() if isinstance(t, float)}
        best = min(ok, key=ok.get)
        m = math.prod(xshape) // cin // (stride * stride)
        flop = 2 * m * cout * cin * k * k
        row = {"layer": name, "kind": kind, "input": list(xshape), "out_channels": cout, "kernel": k, "bits": bits, "flop": flop,
               "fp16_weight_bytes": cout * cin * k * k * 2, "fused_bytes": fw.words.numel() * 4, "fp16_op_ms": fp16,
               "decode_ms": decode, "decode_plus_op_ms": fp16 + decode, "fused_best": best, "fused_best_ms": ok[best],
               "in_configs": best in {c.name for c in CONFIGS}, "fused_ms": fused}  # fmt: skip
        rows.append(row)
        print(f"{name:26s} M={m:5d} fp16 {fp16 * 1e3:7.1f} us  decode {decode * 1e3:6.1f}  fused {ok[best] * 1e3:7.1f} ({best}) "
              f"{flop / ok[best] / 1e9:6.0f} TFLOP/s", flush=True)  # fmt: skip
    res = {"command": "python benchmarks/fused_lowbit_layers.py " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(),
           "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__}, "layers": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
