"""SDXL and SD-v1.5 at 1.99 bits against FP16 in one run: the UNet step, its peak memory, and the peak GPU memory
of a whole generation.

Random weights (speed and memory do not depend on the values), each model at its native size (SD-v1.5 512x512,
SDXL 1024x1024), batch 2 (one image with classifier-free guidance), fp16. For each model:

- UNet step, every configuration measured in this run, ratios against the fastest FP16 one:
    fp16_eager            diffusers' UNet2DConditionModel, eager
    fp16_graph_cl         the torch backend's UNet (time table), channels-last, replayed from a CUDA graph
    fp16_compile_cl       torch.compile(mode="reduce-overhead"), channels-last
    fp16_compile_graph_cl torch.compile(mode="default") in the backend's own CUDA graph
    lowbit_compile_graph_cl[_ahead2]  the 1.99-bit packed codes decoded inside the compiled step per block
                          (bf infer --backend torch --compile), optionally into 2 slots ahead on a side stream
  Peak memory: what a configuration allocates on top of an empty GPU while it steps (weights, codes, activations).
  SD-v1.5's bits: the shipped recipe's mix (tools/sd15_mix.py); SDXL's: results/sdxl_recipe_1.99.json.
- A whole generation, FP16 and 1.99 bits with the same settings, as the first generation of `bf infer --backend torch
  --compile --low-memory` holds it (and the prompt's hidden states and the UNet's inputs kept on the GPU):
  the text encoders run first, one at a time, and are released; the UNet steps (FP16: CUDA graph; 1.99 bits:
  compiled, codes resident); then the UNet's CUDA graph and its activations are released, its weights kept, and the
  VAE decodes in 512x512 tiles (diffusers' enable_tiling with 512-pixel tiles; SDXL's VAE in bfloat16, as low
  memory runs it: it overflows in float16). Peak allocated over the whole run, and by phase. cuDNN's autotuner is
  off here, as in bf infer: its trial workspaces would count towards the peak. After the step configurations (without
  --generation-only) the UNet's convolutions may reuse the plans they autotuned: --generation-only measures the
  generations as a fresh process runs them.

    python benchmarks/sdxl_step_and_memory.py [--archs sd15,sdxl] [--out results/sdxl_step_and_memory.json]
    python benchmarks/sdxl_step_and_memory.py --generation-only   # the generations' memory alone
    python benchmarks/sdxl_step_and_memory.py --device cpu --archs sd15-tiny,sdxl-tiny --iters 2   # the logic, on a CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

TARGETS = {"packed_unet_bytes": 0.70e9, "step_vs_best_fp16": 1.05, "unet_peak_vs_fp16": 0.35, "generation_peak_bytes": 2.0e9}


class Bench:
    def __init__(self, device: str, iters: int):
        self.device, self.iters, self.cuda = device, iters, device == "cuda"
        self.dtype = torch.float16 if self.cuda else torch.float32

    def clean(self) -> int:
        """The SD-v1.5 benchmarks' clean() on a GPU (memory allocated after it); on the CPU a collection alone."""
        from sd15_unet_step import clean

        if self.cuda:
            return clean()
        gc.collect()
        return 0

    def peak(self, base: int) -> int | None:
        return torch.cuda.max_memory_allocated() - base if self.cuda else None

    def time_ms(self, call) -> dict:
        """The SD-v1.5 benchmarks' timing (CUDA events) on a GPU; wall clock on the CPU, where only the logic runs."""
        from sd15_compiled_step import timed
        from sd15_unet_step import stats

        if self.cuda:
            return timed(call, self.iters)
        call()
        times = []
        for _ in range(self.iters):
            t0 = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - t0))
        return stats(times)


def torch_unet(master, b: Bench):
    """The torch backend's UNet over a copy of ``master`` (FP16 weights, time table; not captured: the caller compiles
    or captures it), channels-last on the GPU."""
    from bf.runtime.backend_torch import TorchUNet

    return TorchUNet(copy.deepcopy(master), torch.arange(980, -1, -20), weights="fp", device=b.device, channels_last=b.cuda,
                     cuda_graph=False, dtype=str(b.dtype).removeprefix("torch."))  # fmt: skip


def model_parts(arch_name: str):
    """The architecture, its UNet (random, fp16 on the CPU), the quantizable layers' shapes and their bits."""
    from diffusers import UNet2DConditionModel

    from bf.format import EDGE_BITS, EDGE_LAYERS, candidate_layers, quantizable_layers
    from bf.models.architectures import ARCHITECTURES

    arch = ARCHITECTURES[arch_name]
    torch.manual_seed(0)
    master = UNet2DConditionModel(**arch.unet).half().eval()
    state_shapes = {k: tuple(v.shape) for k, v in master.state_dict().items()}
    shapes = quantizable_layers(state_shapes)
    if arch_name == "sdxl":
        from bf.trainer.recipe import load_recipe

        bits = dict(load_recipe(REPO / "results" / "sdxl_recipe_1.99.json")["layers"])
    elif arch_name == "sd15":
        from sd15_mix import mixed_bits

        bits = mixed_bits(candidate_layers(state_shapes))
    else:  # tiny architectures: the shipped recipe transferred onto them
        from bf.models.directory import ModelDir
        from bf.models.shipped import shipped_model_dir
        from bf.trainer.recipe import load_recipe
        from bf.trainer.recipe_transfer import transfer_recipe

        ref = {k: tuple(v.shape) for k, v in ModelDir.open(shipped_model_dir()).read_weights("unet").items()}
        bits, _ = transfer_recipe(load_recipe(REPO / "results" / "shapes_recipe_1.99.json")["layers"], ref, state_shapes, 1.99)
    return arch, master, shapes, bits | dict.fromkeys(EDGE_LAYERS, EDGE_BITS)


def unet_inputs(arch, master, size: int, batch: int, b: Bench):
    """(sample, step, context) for the torch backend's UNet (SDXL: the added conditioning packed after the hidden
    states), and the eager diffusers call's extra arguments."""
    from bf.models.added_condition import pack, pooled_dim

    g = torch.Generator().manual_seed(0)
    lat = size // 8
    sample = torch.randn(batch, 4, lat, lat, generator=g)
    hidden = torch.randn(batch, 77, master.config.cross_attention_dim, generator=g)
    added = None
    context = hidden
    if arch.family == "sdxl":
        added = {"text_embeds": torch.randn(batch, pooled_dim(master.config), generator=g),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32)}  # fmt: skip
        context = pack(hidden, added["text_embeds"], added["time_ids"])
    to = dict(device=b.device, dtype=b.dtype)
    inputs = (sample.to(**to), torch.zeros(1, dtype=torch.long, device=b.device), context.to(**to))
    eager_kw = {"added_cond_kwargs": {k: v.to(**to) for k, v in added.items()}} if added else {}
    return inputs, (hidden.to(**to), eager_kw)


def unet_configs(arch_name: str, arch, master, shapes, bits, size: int, batch: int, b: Bench, quick: bool) -> dict:
    from sd15_compiled_step import graphed_step, warm_up
    from sd15_unet_step import random_packed

    from bf.runtime.backend_torch import TorchUNet, _smallest_inputs
    from bf.runtime.compiled_weights import AHEAD_COMPILE_OPTIONS, STEP_PRIORITY, compile_weights, decode_ahead, packed_bytes

    timesteps = torch.arange(980, -1, -20)
    inputs, (hidden, eager_kw) = unet_inputs(arch, master, size, batch, b)
    configs, outputs = {}, {}
    cl = b.cuda  # channels-last where it pays (the GPU)

    def record(name, step, base, extra=None, resident=0):
        with torch.inference_mode():
            configs[name] = b.time_ms(lambda: step(*inputs)) | (extra or {})
            outputs[name] = step(*inputs).float().clone()
        p = b.peak(base)
        configs[name]["peak_mem_bytes"] = None if p is None else p + resident
        mem = "" if p is None else f", peak {configs[name]['peak_mem_bytes'] / 1e9:.3f} GB"
        print(f"{arch_name} {name}: {configs[name]['median_ms']:.3f} ms/step{mem}", flush=True)

    base = b.clean()
    unet = copy.deepcopy(master).to(b.device, b.dtype)
    t = torch.tensor(999, device=b.device)
    record("fp16_eager", lambda s, i, c, unet=unet: unet(s, t, hidden, **eager_kw).sample, base)
    del unet
    if b.cuda:
        base = b.clean()
        fp16 = TorchUNet(copy.deepcopy(master), timesteps, weights="fp", device=b.device, channels_last=cl)
        record("fp16_graph_cl", fp16.step, base)
        del fp16
        for mode, label in [("reduce-overhead", "compile"), ("default", "compile_graph")][1 if quick else 0 :]:
            base = b.clean()
            fp16 = torch_unet(master, b)
            step = graphed_step(fp16.eager_step, mode)
            with torch.inference_mode():
                extra = {"warmup_s": warm_up(step, inputs)}
            record(f"fp16_{label}_cl", step, base, extra)
            del fp16, step
            torch._dynamo.reset()
    fp16_names = [k for k in configs if k.startswith("fp16_")]
    best_fp16 = min(fp16_names, key=lambda k: configs[k]["median_ms"])

    packed = random_packed(shapes, bits, cl, seed=1, device=b.device)

    def lowbit_config(name: str, ahead: int) -> None:
        base = b.clean()
        model = torch_unet(master, b)
        compile_weights(model.unet, packed, b.dtype)
        extra = {"ahead_slots": ahead}
        if ahead:
            small = _smallest_inputs(model.unet, b.device, b.dtype)
            extra["slot_bytes"] = decode_ahead(model.unet, lambda: model.eager_step(*small), ahead,
                                               log=lambda msg: print(f"{arch_name} {name}: {msg}", flush=True))  # fmt: skip
        b.clean()  # the FP16 weights the compiled layers replaced are gone
        if b.cuda:
            step = graphed_step(model.eager_step, "default", AHEAD_COMPILE_OPTIONS if ahead else None, STEP_PRIORITY if ahead else 0)
            with torch.inference_mode():
                extra["warmup_s"] = warm_up(step, inputs)
        else:
            step = model.eager_step
        record(name, step, base, extra, resident=packed_bytes(model.unet))

    for ahead in (0, 2) if b.cuda else (0,):
        name = "lowbit_compile_graph_cl" + (f"_ahead{ahead}" if ahead else "") if b.cuda else "lowbit_eager"
        try:
            lowbit_config(name, ahead)
        except Exception as e:  # one configuration that cannot run (or runs out of memory) leaves the others' figures
            configs[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
            print(f"{arch_name} {name}: {configs[name]['error']}", flush=True)
        finally:
            if b.cuda:
                torch._dynamo.reset()
            b.clean()
    lowbit = [k for k in configs if k.startswith("lowbit_") and "error" not in configs[k]]
    if not lowbit:
        failed = "; ".join(configs[k]["error"] for k in configs if "error" in configs[k])
        raise RuntimeError(f"{arch_name}: no 1.99-bit configuration ran: {failed}")
    best = min(lowbit, key=lambda k: configs[k]["median_ms"])
    ref = outputs[best_fp16]
    res = {
        "configs": configs,
        "best_fp16_config": best_fp16,
        "lowbit_config": best,
        "packed_codes_bytes": sum(p.codes.nbytes + p.scale.nbytes for p in packed.values()),
        "fp16_unet_bytes": sum(2 * p.numel() for p in master.parameters()),
        "step_vs_best_fp16": configs[best]["median_ms"] / configs[best_fp16]["median_ms"],
        "lowbit_output_rms_vs_fp16_output_rms": float(outputs[best].pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
    }
    if b.cuda:
        res["unet_peak_vs_fp16"] = configs[best]["peak_mem_bytes"] / configs[best_fp16]["peak_mem_bytes"]
    return res


def generation_memory(arch, master, shapes, bits, size: int, b: Bench, lowbit: bool, steps: int = 3) -> dict:
    """Peak memory of text encoders -> UNet steps -> tiled VAE decode, each released after its phase."""
    from diffusers import AutoencoderKL
    from sd15_unet_step import random_packed
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bf.runtime.backend_torch import VAE_TILE_PX, TorchUNet, vae_run_dtype
    from bf.runtime.compiled_weights import compile_weights
    from bf.runtime.torch_graph import GraphedCall

    phases = {}
    base = b.clean()
    start = time.perf_counter()
    ids = torch.zeros(2, 77, dtype=torch.long, device=b.device)
    encoders = [(CLIPTextModel, arch.text_encoder)] + ([(CLIPTextModelWithProjection, arch.text_encoder_2)] if arch.text_encoder_2 else [])
    hidden = []  # (kept, as a generation keeps the prompts' hidden states through the UNet phase)
    for cls, cfg in encoders:  # one at a time, released after use
        te = cls(CLIPTextConfig(**cfg)).to(b.device, b.dtype).eval()
        with torch.inference_mode():
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        del te, out
        gc.collect()
        if b.cuda:
            torch.cuda.empty_cache()
    phases["text_encoders_peak_bytes"] = b.peak(base)
    inputs, _ = unet_inputs(arch, master, size, 2, b)
    if lowbit and b.cuda:  # as bf infer --backend torch --compile builds it: the FP16 weights never reach the GPU
        model = TorchUNet(copy.deepcopy(master), torch.arange(980, -1, -20), random_packed(shapes, bits, True, seed=1, device=b.device),
                          weights="streamed", compile=True, device=b.device, channels_last=True, cuda_graph=True)  # fmt: skip
        step = model.step
    elif lowbit:
        model = torch_unet(master, b)
        compile_weights(model.unet, random_packed(shapes, bits, False, seed=1, device=b.device), b.dtype)
        step = model.eager_step
    else:
        model = torch_unet(master, b)
        step = GraphedCall(model.eager_step) if b.cuda else model.eager_step
    with torch.inference_mode():
        for _ in range(steps):
            latents = step(*inputs)[:1].float().clone()
    # as bf infer --backend torch --low-memory holds it: the UNet's weights stay, its CUDA graph and activations go
    if isinstance(step, GraphedCall):  # (TorchUNet.step is one too)
        step.release()
    del step
    gc.collect()
    if b.cuda:
        torch.cuda.empty_cache()
    phases["through_unet_peak_bytes"] = b.peak(base)
    phases["unet_resident_bytes"] = torch.cuda.memory_allocated() - base if b.cuda else None
    vae_dtype = vae_run_dtype(torch, b.dtype, bool(arch.vae.get("force_upcast")), True, b.device)  # as low memory runs it
    vae = AutoencoderKL(**arch.vae).eval().to(b.device, vae_dtype)
    vae.enable_tiling()
    tile = min(VAE_TILE_PX, size)  # as the runtime's low memory tiles
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    with torch.inference_mode():
        image = vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor).sample
    del vae, model
    if b.cuda:
        torch._dynamo.reset()  # before collecting: what it releases may hold the UNet in cycles
    gc.collect()
    peak = b.peak(base)
    return {"peak_bytes": peak, **phases, "image_shape": list(image.shape), "vae_dtype": str(vae_dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - start, 2), "unet_steps": steps}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="sd15,sdxl", help="bf random-model architectures, each at its native size")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="FP16: CUDA graph and compile+graph only")
    ap.add_argument("--generation-only", action="store_true", help="the whole generations' memory alone (no UNet step figures)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sdxl_step_and_memory.json")
    args = ap.parse_args()
    from bf.cli.output import write_json

    b = Bench(args.device, args.iters)
    res = {
        "command": " ".join(["python", "benchmarks/sdxl_step_and_memory.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_properties(0).name if b.cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {"batch": 2, "dtype": str(b.dtype).removeprefix("torch."), "iters": args.iters},
        "weights": "random: diffusers' init for FP16; codes uniform over the levels, scales at the init's magnitude",
        "targets": TARGETS,
        "models": {},
    }
    for name in args.archs.split(","):
        arch, master, shapes, bits = model_parts(name)
        size = arch.unet["sample_size"] * 8  # native: the UNet's latent size x the VAE's 8
        print(f"{name}: {sum(p.numel() for p in master.parameters()) / 1e6:.1f}M UNet parameters at {size}x{size}", flush=True)
        out = {"size": size}
        if not args.generation_only:
            torch.backends.cudnn.benchmark = b.cuda  # the steps autotune their convolutions, as the SD-v1.5 benchmarks do
            out |= unet_configs(name, arch, master, shapes, bits, size, 2, b, args.quick)
        torch.backends.cudnn.benchmark = False  # as bf infer runs: the autotuner's trial workspaces are no part of a generation
        for label, lowbit in (("fp16", False), ("lowbit", True)):
            out[f"generation_{label}"] = generation_memory(arch, master, shapes, bits, size, b, lowbit)
            g = out[f"generation_{label}"]
            if g["peak_bytes"] is not None:
                print(f"{name} generation {label}: peak {g['peak_bytes'] / 1e9:.3f} GB (text {g['text_encoders_peak_bytes'] / 1e9:.3f}, "
                      f"through UNet {g['through_unet_peak_bytes'] / 1e9:.3f})", flush=True)  # fmt: skip
        if b.cuda:
            out["generation_peak_vs_fp16"] = out["generation_lowbit"]["peak_bytes"] / out["generation_fp16"]["peak_bytes"]
            out["within_targets"] = {"generation_peak": out["generation_lowbit"]["peak_bytes"] < TARGETS["generation_peak_bytes"]}
            if not args.generation_only:
                out["within_targets"] |= {
                    "packed_unet": out["packed_codes_bytes"] <= TARGETS["packed_unet_bytes"],
                    "step": out["step_vs_best_fp16"] <= TARGETS["step_vs_best_fp16"],
                    "unet_peak": out["unet_peak_vs_fp16"] <= TARGETS["unet_peak_vs_fp16"],
                }
        res["models"][name] = out
        del master
        # after each model: a later model's failure leaves this one's figures
        errors = [f"{m}: {k}" for m, mod in res["models"].items() for k, c in mod.get("configs", {}).items() if "error" in c]
        res["failed_configs"] = errors
        res["complete"] = name == args.archs.split(",")[-1] and not errors
        write_json(args.out, res)
        if not res["complete"]:
            print(f"(the figures so far: up to {name})", flush=True)


if __name__ == "__main__":
    main()
