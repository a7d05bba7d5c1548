"""What a LoRA costs the SD-v1.5 UNet step at 1.99 bits: a rank-16 adapter on every attention projection (to_q, to_k,
to_v, to_out.0 of every self- and cross-attention: 128 layers), run as ``bf infer --backend torch --lora`` runs it
(bf.lora_adapters: added to the low-bit weights where the compiled step decodes them; low-rank branches beside the
streamed ring's layers), against the same step without it, in one run.

Random weights, 512x512, batch 2, fp16, channels-last. Each pair is measured the way a user runs it:

  lowbit_compile      the torch backend compiled (``--compile``): codes decoded inside the step, inductor's kernels
                      replayed from the backend's CUDA graph
  lowbit_streamed     the torch backend's default: the streamed ring, CUDA graph
  fp16_compile        FP16 compiled the same way (the LoRA's cost on the unquantized model, for comparison)

each ``_lora`` with the adapter. The compiled 1.99-bit step with the LoRA is checked against the same codes decoded once
with the same LoRA, eager.

    python benchmarks/sd15_lora_step.py [--out results/sd15_lora_step.json] [--rank 16] [--iters 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
from sd15_compiled_step import timed, warm_up  # noqa: E402
from sd15_unet_step import clean, random_packed, run_record, sd15_mixed_unet  # noqa: E402

DEV = "cuda"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_file(path: Path, unet, rank: int, seed: int = 0) -> int:
    """A random rank-``rank`` LoRA on every attention projection of ``unet``, in diffusers' format; how many layers."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if any(name.endswith(f".{p}") for p in PROJECTIONS) and isinstance(m, torch.nn.Linear):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    save_file(tensors, str(path))
    return len(tensors) // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, default=None, help="the decode library (default: found as bf.native says)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_lora_step.json")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--configs", default="lowbit_compile,lowbit_streamed,fp16_compile", help="which pairs to measure")
    args = ap.parse_args()

    from bf.decode_kernels import load
    from bf.runtime.backend_torch import TorchUNet

    lib = load(args.lib)
    res: dict = run_record("benchmarks/sd15_lora_step.py", args)
    master, shapes, bits = sd15_mixed_unet()
    packed = random_packed(shapes, bits, True, seed=1)
    timesteps = torch.arange(980, -1, -20)
    g = torch.Generator(device=DEV).manual_seed(0)
    b, h = args.batch, args.size // 8
    inputs = (torch.randn(b, 4, h, h, device=DEV, generator=g).half(), torch.zeros(1, dtype=torch.long, device=DEV),
              torch.randn(b, 77, 768, device=DEV, generator=g).half())  # fmt: skip
    configs: dict = {}
    outputs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(tmp) / "lora.safetensors"
        res["lora"] = {"rank": args.rank, "layers": lora_file(lora, master, args.rank), "targets": list(PROJECTIONS),
                       "bytes": lora.stat().st_size}  # fmt: skip
        loras = [(lora, 1.0)]
        wanted = args.configs.split(",")
        for kind in wanted:
            for with_lora in (False, True):
                name = kind + ("_lora" if with_lora else "")
                weights = "fp" if kind.startswith("fp16") else "streamed"
                base = clean()
                model = TorchUNet(copy.deepcopy(master), timesteps, None if weights == "fp" else packed, weights=weights, device=DEV,
                                  decoder=lib, compile=kind.endswith("compile"), loras=loras if with_lora else ())  # fmt: skip
                resident = 0 if weights == "fp" else sum(p.codes.nbytes + p.scale.nbytes for p in packed.values())
                with torch.inference_mode():
                    extra = {"warmup_s": warm_up(model.step, inputs)}
                    configs[name] = timed(lambda model=model: model.step(*inputs), args.iters) | extra
                    outputs[name] = model.step(*inputs).float().clone()
                configs[name]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base + resident
                if model.lora is not None:  # how the backend ran the adapters: added to the decoded weights, or hooked
                    configs[name]["lora_branches"] = model.lora.counts
                c = configs[name]
                print(f"{name}: {c['median_ms']:.3f} ms/step, peak {c['peak_mem_bytes'] / 1e9:.3f} GB, warm-up {c['warmup_s']:.1f} s",
                      flush=True)  # fmt: skip
                del model
                torch._dynamo.reset()
        # the same codes decoded once, the same LoRA, eager: what the compiled step with the LoRA must equal
        ref_model = TorchUNet(copy.deepcopy(master), timesteps, packed, weights="decoded", device=DEV, decoder=lib, cuda_graph=False,
                              loras=loras)  # fmt: skip
        with torch.inference_mode():
            ref = ref_model.step(*inputs).float()
        del ref_model
    checks = {}
    for name in outputs:
        if name.startswith("lowbit") and name.endswith("_lora"):
            out, plain = outputs[name], outputs[name.removesuffix("_lora")]
            checks[name] = {"max_abs_diff_vs_decoded_eager_lora": (out - ref).abs().max().item(), "ref_max_abs": ref.abs().max().item(),
                            "lora_changes_output_by": (out - plain).abs().max().item()}  # fmt: skip
    ratios = {kind: {"step": configs[f"{kind}_lora"]["median_ms"] / configs[kind]["median_ms"],
                     "peak_mem": configs[f"{kind}_lora"]["peak_mem_bytes"] / configs[kind]["peak_mem_bytes"]}
              for kind in wanted}  # fmt: skip
    res.update(configs=configs, checks=checks, lora_step_ratio=ratios,
               targets={f"{k}_lora_at_most_1.05x": v["step"] <= 1.05 for k, v in ratios.items() if k.startswith("lowbit")})  # fmt: skip
    for kind, r in ratios.items():
        print(f"{kind}: the LoRA costs {100 * (r['step'] - 1):+.1f}% step time, {100 * (r['peak_mem'] - 1):+.1f}% peak memory")
    print(json.dumps(checks, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
