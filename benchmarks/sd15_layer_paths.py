"""Every convolution and linear layer of SD-v1.5's UNet step (512x512, batch 2, fp16), grouped into classes of equal
shape and bit width, each class timed on the ways a layer can get its weight, with the weights cold in the GPU's L2
cache as in a step: a timed call cycles over enough copies of the class's weight (about 3x the L2 cache) that none is
still cached when it comes round again. Multiplied by how often the step runs each class, the sums say what each way
costs the step's layers, against FP16's:

  fp16          the layer on FP16 weights: cuDNN convolution (channels-last) or cuBLAS linear (the baseline)
  decode+op     the packed codes decoded into a buffer by the plugins_trt kernel, then the FP16 op (the compiled
                step today, one buffer per weight)
  decode1+op    the same, every copy decoded into one reused buffer (what a decode into a slot that the op reads at
                once could gain from L2)
  gemm          a convolution as an im2col copy and one cuBLAS matrix product, FP16 weights (a linear: as fp16)
  decode+gemm   decode into a buffer, then im2col and the matrix product
  fused         bf.runtime.lowbit_gemm's Triton kernel on the codes (--fused: the best of the runtime's tile configurations
                and of a wider search: split-K sized to the GPU, fp16 levels by conversion or from bit patterns;
                each configuration's output checked against the FP16 layer's)

Per-layer medians of CUDA-graph replays (bf.runtime.torch_graph.graph_time_ms), so no host launch overhead counts. On a
CPU (--device cpu) only the paths' outputs are checked against each other, on sd15-tiny.

    python benchmarks/sd15_layer_paths.py [--lib libbf_decode.so] [--fused] [--low-res] [--out results/sd15_layer_paths.json]
    python benchmarks/sd15_layer_paths.py --device cpu --arch sd15-tiny   # the logic, on a CPU
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
L2_COLD_BYTES = 150e6  # about 3x the L2 cache of an H100/H200 (50 MB)


def layer_classes(arch_name: str, device: str, dtype) -> list[dict]:
    """The quantized layers the step runs, grouped by (kind, input shape, weight shape, stride, padding, bits)."""
    from diffusers import UNet2DConditionModel

    from bf.format import EDGE_BITS, EDGE_LAYERS, candidate_layers, quantizable_layers
    from bf.models.architectures import ARCHITECTURES

    arch = ARCHITECTURES[arch_name]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**arch.unet).to(device, dtype).eval()
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    quantized = quantizable_layers(shapes)
    if arch_name == "sd15":
        from sd15_mix import mixed_bits

        bits = mixed_bits(candidate_layers(shapes)) | dict.fromkeys(EDGE_LAYERS, EDGE_BITS)
    else:
        bits = {name: 1 + i % 3 for i, name in enumerate(sorted(quantized))} | dict.fromkeys(EDGE_LAYERS, EDGE_BITS)
    seen = {}

    def hook(name):
        def record(module, args):
            x = args[0]
            if isinstance(module, torch.nn.Conv2d):
                key = ("conv", tuple(x.shape), tuple(module.weight.shape), module.stride[0], module.padding[0], bits[name])
            else:
                key = ("linear", tuple(x.shape), tuple(module.weight.shape), 1, 0, bits[name])
            seen.setdefault(key, []).append(name)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in unet.named_modules() if n in quantized]
    size = arch.unet["sample_size"]
    sample = torch.randn(2, 4, size, size, device=device, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        unet(sample, 999, context)
    for h in handles:
        h.remove()
    classes = [{"kind": k[0], "input": list(k[1]), "weight": list(k[2]), "stride": k[3], "padding": k[4], "bits": k[5], "count": len(v),
                "example": v[0]} for k, v in seen.items()]  # fmt: skip
    return sorted(classes, key=lambda c: -math.prod(c["weight"]) * c["count"])


def im2col_gemm(x: torch.Tensor, w_rows: torch.Tensor, kernel: int, stride: int, padding: int, bias) -> torch.Tensor:
    """A convolution as one matrix product: ``x`` NCHW (any strides), ``w_rows`` [out, kh * kw * in] in (kh, kw, in)
    order (the .bfq's stored order for a channels-last weight). Returns NCHW with channels-last strides."""
    b, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    padded = F.pad(nhwc, (0, 0, padding, padding, padding, padding))
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    sb, sh, sw, sc = padded.stride()
    cols = padded.as_strided((b, oh, ow, kernel, kernel, c), (sb, sh * stride, sw * stride, sh, sw, sc)).reshape(b * oh * ow, -1)
    out = torch.addmm(bias, cols, w_rows.t()) if bias is not None else cols @ w_rows.t()
    return out.view(b, oh, ow, -1).permute(0, 3, 1, 2)


class LayerClass:
    """One class's inputs, ``copies`` of its weight (FP16, packed codes, decode buffers) and its paths."""

    def __init__(self, cls: dict, device: str, dtype, lib, gen: torch.Generator):
        from bf.format.dequant_op import DequantSpec
        from bf.format.grid import Grid
        from bf.format.packing import pack_codes

        self.cls, self.device = cls, device
        self.conv = cls["kind"] == "conv"
        out_ch, fan_in = cls["weight"][0], math.prod(cls["weight"][1:])
        stored = (out_ch, *cls["weight"][2:], cls["weight"][1]) if self.conv else tuple(cls["weight"])  # (kh, kw, in) order
        fp16_bytes = 2 * out_ch * fan_in
        self.copies = max(2, min(64, math.ceil(L2_COLD_BYTES / fp16_bytes))) if device == "cuda" else 2
        grid = Grid(cls["bits"])
        self.spec = DequantSpec(stored, grid)
        codes = torch.randint(0, grid.levels, stored, generator=gen)
        packed = torch.from_numpy(pack_codes(codes.numpy().astype("int32"), self.spec.packing)).to(device)
        self.scale = torch.full((out_ch,), 1.0 / math.sqrt(fan_in) / grid.qmax, device=device)
        self.packed = [packed.clone() for _ in range(self.copies)]
        self.lib, self.dtype = lib, dtype
        self.rows = [self.decode(p, torch.empty(stored, device=device, dtype=dtype)) for p in self.packed]  # FP16 weights
        self.buffers = [torch.empty_like(r) for r in self.rows]
        self.bias = torch.randn(out_ch, generator=gen).to(device, dtype)
        x = torch.randn(cls["input"], generator=gen).to(device, dtype)
        self.x = x.contiguous(memory_format=torch.channels_last) if self.conv else x
        self.levels, self.codes = grid.levels, codes  # (on the CPU: only the fused kernel's layout needs them)

    def decode(self, packed, out):
        if self.device == "cuda":
            return self.lib.decode_cuda(packed, self.scale, self.spec, out=out)
        from bf.format.dequant_op import reference_dequant

        out.copy_(torch.from_numpy(reference_dequant(packed.cpu().numpy(), self.scale.cpu().numpy(), self.spec)).reshape(out.shape))
        return out

    def op(self, w):
        """The layer on weight ``w`` (stored order) as the FP16 model runs it."""
        if self.conv:
            return F.conv2d(self.x, w.permute(0, 3, 1, 2), self.bias, self.cls["stride"], self.cls["padding"])
        return F.linear(self.x, w, self.bias)

    def gemm(self, w):
        if self.conv:
            return im2col_gemm(self.x, w.reshape(w.shape[0], -1), self.cls["weight"][2], self.cls["stride"], self.cls["padding"], self.bias)
        return F.linear(self.x, w, self.bias)

    def paths(self, fused: bool) -> dict:
        """name -> a call over every copy (timed per copy)."""
        n = range(self.copies)
        out = {
            "fp16": lambda: [self.op(self.rows[i]) for i in n],
            "decode+op": lambda: [self.op(self.decode(self.packed[i], self.buffers[i])) for i in n],
            "decode1+op": lambda: [self.op(self.decode(self.packed[i], self.buffers[0])) for i in n],
            "gemm": lambda: [self.gemm(self.rows[i]) for i in n],
            "decode+gemm": lambda: [self.gemm(self.decode(self.packed[i], self.buffers[i])) for i in n],
        }
        if fused:
            out.update(self.fused_paths())
        return out

    def fused_paths(self) -> dict:
        from bf.runtime.fused_layout import fusable, fused_weight
        from bf.runtime.lowbit_gemm import lowbit_forward

        w = self.cls["weight"]
        module = torch.nn.Conv2d(w[1], w[0], w[2], self.cls["stride"], self.cls["padding"]) if self.conv else torch.nn.Linear(w[1], w[0])
        if fusable(module, self.levels) is not None:
            return {}
        codes = self.codes.to(self.device)
        fws = [fused_weight(codes, self.scale, module, self.levels) for _ in range(self.copies)]
        return {f"fused {c.name}": (lambda c=c: [lowbit_forward(self.x, fw, c, self.bias) for fw in fws]) for c in fused_search()}


def fused_search() -> list:
    """The fused kernel's tile configurations tried: the runtime's (levels from bit patterns), one by int-to-float
    conversion, then split-K sized to the GPU."""
    import dataclasses

    from bf.runtime.lowbit_gemm import CONFIGS, TileConfig

    return [
        *CONFIGS,
        dataclasses.replace(CONFIGS[4], magic=False),
        TileConfig(128, 128, 64, 8, 3, splits=0),
        TileConfig(128, 64, 64, 4, 4, splits=0),
        TileConfig(64, 128, 64, 4, 4, splits=0),
        TileConfig(64, 64, 64, 4, 4, splits=0),
        TileConfig(128, 128, 128, 8, 3, splits=0),
        TileConfig(64, 128, 128, 4, 3, splits=0),
    ]


def check_paths(lc: LayerClass, fused: bool = False) -> dict:
    """Each path's largest difference from the FP16 layer's output, relative to its largest value."""
    ref = lc.op(lc.rows[0]).float()
    diffs = {}
    for name, call in lc.paths(fused).items():
        try:
            diffs[name] = ((call()[0].float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        except Exception as e:  # a fused tile this GPU cannot hold (registers, shared memory) is a result, not a failure
            if not name.startswith("fused "):
                raise
            print(f"  {name}: {type(e).__name__}", flush=True)
            diffs[name] = math.inf
    return diffs


def low_res(cls: dict) -> bool:
    """A layer at SD-v1.5's 8x8 or 16x16 latents at 512x512, the size this script runs (64 and 256 tokens): where
    the weights outweigh the compute."""
    shape = cls["input"]
    return shape[2] <= 16 if cls["kind"] == "conv" else shape[1] in (64, 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lib", type=Path, default=None)
    ap.add_argument("--fused", action="store_true", help="also the fused Triton kernel (compiles each tile configuration per class)")
    ap.add_argument("--low-res", action="store_true", help="only the layers at the 8x8 and 16x16 latents (64 and 256 tokens)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_layer_paths.json")
    args = ap.parse_args()
    from bf.cli.output import write_json
    from bf.decode_kernels import load
    from bf.runtime.torch_graph import graph_time_ms

    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    lib = load(args.lib) if cuda else None
    classes = layer_classes(args.arch, args.device, dtype)
    if args.low_res:
        classes = [c for c in classes if low_res(c)]
    print(f"{args.arch}: {sum(c['count'] for c in classes)} quantized layers in {len(classes)} classes", flush=True)
    gen = torch.Generator().manual_seed(0)
    totals = defaultdict(float)
    for cls in classes:
        lc = LayerClass(cls, args.device, dtype, lib, gen)
        diffs = check_paths(lc, args.fused and cuda)
        cls["max_rel_diff_vs_fp16"] = max(v for k, v in diffs.items() if not k.startswith("fused "))
        if cuda:
            with torch.inference_mode():
                ms = {}
                for name, call in lc.paths(args.fused).items():
                    if not diffs[name] <= 1e-2:  # a wrong result (NaN, or none) is reported, never timed as a candidate
                        if not math.isinf(diffs[name]):
                            print(f"  {name}: max relative difference {diffs[name]:.2e} from the FP16 layer", flush=True)
                        continue
                    ms[name] = graph_time_ms(call, reps=1) / lc.copies
            fused = {k: v for k, v in ms.items() if k.startswith("fused ")}
            if fused:
                best = min(fused, key=fused.get)
                ms = {k: v for k, v in ms.items() if not k.startswith("fused ")} | {"fused": fused[best]}
                cls["fused_config"] = best.removeprefix("fused ")
                cls["fused_ms"] = {k.removeprefix("fused "): v for k, v in fused.items()}
                cls["fused_max_rel_diff_vs_fp16"] = max(diffs[f"fused {k}"] for k in cls["fused_ms"])
            cls["ms"], cls["copies"] = ms, lc.copies
            for k, v in ms.items():
                totals[k] += v * cls["count"]
            print(f"{cls['kind']:6s} {cls['input']!s:22s} w{cls['weight']!s:22s} {cls['bits']}b x{cls['count']:2d}: "
                  + "  ".join(f"{k} {v * 1e3:6.1f}" for k, v in ms.items()) + " us", flush=True)  # fmt: skip
        del lc
    res = {
        "command": " ".join(["python", "benchmarks/sd15_layer_paths.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"torch": torch.__version__},
        "settings": {"arch": args.arch, "batch": 2, "dtype": str(dtype).removeprefix("torch."), "l2_cold_bytes": L2_COLD_BYTES},
        "classes": classes,
        "max_rel_diff_vs_fp16": max(c["max_rel_diff_vs_fp16"] for c in classes),
    }
    if cuda:
        base = totals["fp16"]
        res["step_layers_ms"] = dict(totals)
        res["step_layers_vs_fp16"] = {k: v / base for k, v in totals.items()}
        res["step_layers_minus_fp16_ms"] = {k: v - base for k, v in totals.items()}
        print("the step's layers: " + ", ".join(f"{k} {v:.3f} ms ({v - base:+.3f})" for k, v in totals.items()), flush=True)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
