"""The SD-v1.5 UNet step at the 1.99-bit mix against the fastest FP16 a user can pick, on one GPU.

Random weights (speed and memory do not depend on the values), 512x512, batch 2 (one image with
classifier-free guidance), fp16. Every configuration is measured in this one run, and every ratio
is against the fastest FP16 configuration of the run:

  fp16 eager                 diffusers' UNet2DConditionModel, eager
  fp16 graph[_cl]            the torch backend's UNet (TorchUNet, time-feature table) replayed from a
                             CUDA graph, NCHW / channels-last
  fp16 compile_cl            torch.compile(mode="reduce-overhead"), channels-last: inductor's fused
                             kernels replayed from CUDA graphs (torch's cudagraph trees)
  fp16 compile_graph_cl      torch.compile(mode="default") captured by the backend's own CUDA graph
  lowbit streamed_cl         the 1.99-bit packed codes resident, each weight decoded into a ring on a
                             side stream (bf.runtime.streamed_weights), CUDA graph; with --keep MB
                             of the largest weights kept decoded
  lowbit compile[_graph]_cl  the codes decoded inside the compiled UNet by the bf::lowbit_decode_group
                             custom op (bf.runtime.compiled_weights), one launch per block just before
                             it (--per-layer-decode: one per layer), both compile flavours above; with
                             --keep MB kept decoded as FP16 weights (default mode, in the step's stream)
  lowbit compile_graph_cl_aheadN  the same, each block's weights decoded ahead on a side stream into N
                             persistent slots (bf::lowbit_decode_ahead) while the blocks before compute,
                             for each N of --ahead; the step captured at the runtime's priority, above the
                             decode stream's (--compute-priority: others), --decode-blocks B: each launch's
                             grid capped at B, --ahead-keep MB: that much of the smallest weights kept decoded
  ..._fused                  (--fused-layers) the same, where a fused kernel (Triton's, or on Hopper the TMA one)
                             reads a layer's codes itself if it measured faster than the op plus the weight's share
                             of a batched decode on the layer's input (--fused-against: other rules)
                             (bf.runtime.compiled_fused); the layers are chosen once per choice rule and shared by the
                             configurations, and a _fused configuration that keeps weights decoded (--fused-keep,
                             --ahead-keep) keeps the smallest of the layers not fused

Peak memory is what a configuration allocates on top of an empty GPU while it steps (weights,
codes, activations, graph pools). The JSON is written after every configuration ("complete": false until the
last), so a run stopped part-way keeps what it measured. Each compile's warm-up (trace, compile, first capture) is timed,
and again after torch._dynamo.reset() (inductor's on-disk cache warm: what the next process pays).
The decoded-weight configurations are checked against the same codes decoded once, run eagerly.
With --profile, one step of FP16 compiled (default mode, the backend's CUDA graph) and of each 1.99-bit
configuration with fused layers, or that keeps nothing decoded, and decodes in its stream or ahead into the first --ahead slots is broken
down by kernel category, as measured (replayed from its CUDA graph, named <config>_graphed) and launched kernel by
kernel (<config>_no_graph); every kernel's start, duration and stream go to <out>_timeline.json
(benchmarks/sd15_step_timeline.py reads it).

    python benchmarks/sd15_compiled_step.py [--out results/sd15_compiled_step.json] [--keep 256,640] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
from interleaved_timing import interleaved_rounds, interleaved_summary  # noqa: E402
from sd15_step_timeline import kernel_category, span_ms, step_kernels, write_timelines  # noqa: E402
from sd15_unet_step import clean, random_packed, run_record, sd15_mixed_unet, stats  # noqa: E402

from bf.runtime.compiled_fused import AGAINST  # noqa: E402
from bf.runtime.compiled_weights import STEP_PRIORITY  # noqa: E402

DEV = "cuda"


def timed(call, iters: int, warmup: int = 3) -> dict:
    from bf.runtime.torch_graph import cuda_time_ms

    return stats(cuda_time_ms(call, iters, warmup))


def build_step(eager_step, mode: str, options: dict | None = None):
    """``eager_step`` compiled. reduce-overhead: replayed from torch's CUDA graphs, whose outputs live in
    torch's graph pool, so every call marks a new step; default: inductor's kernels launched one by one.
    ``options``: inductor's options, for the default mode (decoding ahead: AHEAD_COMPILE_OPTIONS)."""
    how = {"options": options} if options else {"mode": mode}  # torch.compile takes one of the two
    compiled = torch.compile(eager_step, fullgraph=True, **how)
    if mode != "reduce-overhead":
        return compiled

    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return step


def graphed_step(eager_step, mode: str, options: dict | None = None, priority: int = 0):
    """The compiled step replayed from CUDA graphs: torch's (reduce-overhead) or the backend's own (default), the
    latter captured on a stream of CUDA priority ``priority``."""
    from bf.runtime.torch_graph import GraphedCall

    step = build_step(eager_step, mode, options)
    return step if mode == "reduce-overhead" else GraphedCall(step, priority=priority)


def warm_up(step, inputs) -> float:
    """Seconds until ``step`` has compiled and captured (three calls: cudagraph trees record on the second)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        step(*inputs)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile(step, inputs) -> dict:
    """GPU time of one step by kernel category (ms), every kernel's time (longest first), and its timeline: the span
    from the step's first kernel (after the inputs' copies) to the last one's end, each stream's busy time, and the
    kernels in start order (``timeline``: start and duration in us, stream, name; sd15_step_timeline.py reads it). A
    step replayed from a CUDA graph shows its kernels too (CUPTI traces a graph's kernels), on the graph's own streams,
    which hold the step's kernels and the decodes beside them alike."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        step(*inputs)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(*inputs)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    events.sort(key=lambda e: e.time_range.start)
    kernels: dict[str, float] = {}
    streams: dict[str, float] = {}
    for e in events:
        kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total / 1e3
        streams[str(e.device_resource_id)] = streams.get(str(e.device_resource_id), 0.0) + e.time_range.elapsed_us() / 1e3
    category = {n: kernel_category(n) for n in kernels}
    cats: dict[str, float] = {}
    for name, ms in kernels.items():
        cats[category[name]] = cats.get(category[name], 0.0) + ms
    total = sum(cats.values())
    ordered = dict(sorted(cats.items(), key=lambda kv: -kv[1]))
    timeline = [[e.time_range.start, e.time_range.elapsed_us(), e.device_resource_id, e.name[:120]] for e in events]
    t0 = timeline[0][0] if timeline else 0
    return {
        "kernel_ms": total,
        "kernels": len(events),
        "span_ms": span_ms(step_kernels(timeline)),
        "stream_busy_ms": streams,
        "by_category_ms": ordered,
        "by_category_share": {c: v / total for c, v in ordered.items()} if total else {},
        "kernels_ms": [{"name": n[:160], "ms": v, "category": category[n]} for n, v in sorted(kernels.items(), key=lambda kv: -kv[1])],
        "timeline": [[round(k[0] - t0, 2), round(k[1], 2), k[2], k[3]] for k in timeline],
    }  # fmt: skip


class Point(NamedTuple):
    """One 1.99-bit compiled configuration."""

    keep: int = 0  # MB kept decoded
    which: str = "largest"  # which weights are kept: "largest", "smallest" or "launches" (fewest decode kernels)
    mode: str = "default"  # torch.compile's mode
    ahead: int = 0  # slots decoded ahead into (0: in the step's stream)
    blocks: int = 0  # decode launches' grid cap (0: none)
    priority: int = STEP_PRIORITY  # the step's CUDA priority when it decodes ahead (in its stream: 0)
    fused: bool = False  # the fused kernel on the layers it runs faster (bf.runtime.compiled_fused)
    against: str = "stream"  # fused: what the fused kernel is timed against (choose_fused's against)
    margin: float = 1.0  # fused: taken within this factor of the alternative's time (choose_fused's margin)


def point_name(point: Point, labels: dict[str, str], sub_blocks: bool) -> str:
    """A configuration's name in the JSON and the log; ``labels``: torch.compile's mode -> its label."""
    keep, which, mode, ahead, blocks, priority, fused, against, margin = point
    name = f"lowbit_{labels[mode]}_cl" + (f"_ahead{ahead}" if ahead else "") + (f"_blocks{blocks}" if blocks else "")
    name += "" if not keep else f"_keep{keep}MB" if which == "largest" else f"_keep{which}{keep}MB"
    name += f"_priority{priority}" if ahead and priority != STEP_PRIORITY else ""
    name += "_fused" if fused else ""
    name += f"_{against}x{margin:g}" if fused and (against, margin) != ("stream", 1.0) else ""
    return name + ("_subblocks" if sub_blocks else "")


def fused_choice(text: str) -> list[tuple[str, float]]:
    """--fused-choice: AGAINST:MARGIN pairs, checked before anything runs."""
    pairs = []
    for item in (x for x in text.split(",") if x):
        against, _, margin = item.partition(":")
        try:
            factor = float(margin)
        except ValueError:
            factor = math.nan
        if against not in AGAINST or not 0 < factor < math.inf:
            raise argparse.ArgumentTypeError(f"{item!r}: expected AGAINST:MARGIN, AGAINST stream, decode or fp16 and MARGIN a factor "
                                             "above 0, e.g. fp16:1")  # fmt: skip
        pairs.append((against, factor))
    return pairs


def print_profile(label: str, prof: dict) -> None:
    busy = ", ".join(f"stream {s} {v:.2f}" for s, v in prof["stream_busy_ms"].items())
    print(f"profile {label}: {prof['kernel_ms']:.2f} ms of kernels ({prof['kernels']}) over {prof['span_ms']:.2f} ms "
          f"({busy}): " + ", ".join(f"{c} {v:.2f}" for c, v in prof["by_category_ms"].items()), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", type=Path, default=None, help="the decode library (default: found as bf.native says)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sd15_compiled_step.json")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--keep", type=lambda t: [int(x) for x in t.split(",") if x], default=[256, 640],
                    help="MB of the largest weights kept decoded: a point each on the speed/memory curve")  # fmt: skip
    ap.add_argument("--no-nchw", action="store_true", help="skip the NCHW configurations")
    ap.add_argument("--quick", action="store_true", help="compile + CUDA graph only, no cached warm-up")
    ap.add_argument("--per-layer-decode", action="store_true", help="compiled: one decode launch per layer instead of per block")
    ap.add_argument("--sub-blocks", action="store_true",
                    help="compiled: a transformer block's attn1, attn2 and ff decode as blocks of their own (compile_weights' "
                         "sub_blocks), names end _subblocks")  # fmt: skip
    ap.add_argument("--ahead", type=lambda t: [int(x) for x in t.split(",") if x], default=[2, 3],
                    help="compiled: slot counts to decode ahead into, a configuration each")  # fmt: skip
    ap.add_argument("--decode-blocks", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                    help="compiled, decoding ahead into the first --ahead slots, the step at the runtime's priority: grid "
                         "caps of the decode launches, a configuration each")  # fmt: skip
    ap.add_argument("--ahead-keep", type=lambda t: [int(x) for x in t.split(",") if x and int(x) > 0], default=[],
                    help="compiled, decoding ahead into the first --ahead slots, the step at the runtime's priority: MB of "
                         "the smallest weights kept decoded (their blocks' decodes, launches mostly, leave the step), a "
                         "configuration each")  # fmt: skip
    ap.add_argument("--compute-priority", type=lambda t: [int(x) for x in t.split(",") if x], default=[STEP_PRIORITY],
                    help="compiled, decoding ahead into each --ahead: CUDA priorities to capture the step's stream at, a "
                         "configuration each, named _priorityP unless P is the runtime's (-5, which PyTorch clamps to the "
                         "highest priority it creates streams at); the decode stream's is 0, the lowest. A list that starts "
                         "with a minus is written --compute-priority=-5,0")  # fmt: skip
    ap.add_argument("--fused-layers", action="store_true",
                    help="compiled: also each in-stream, first --ahead and --ahead-keep configuration with the layers the fused "
                         "kernel runs faster than the op plus the weight's share of a batched decode "
                         "(bf.runtime.compiled_fused.choose_fused, timed in the run) reading their codes, named _fused")  # fmt: skip
    ap.add_argument("--fused-against", type=lambda t: [x for x in t.split(",") if x], default=["stream"],
                    help="with --fused-layers: the rules to choose the fused layers by (choose_fused's against: stream, decode, "
                         "fp16), the --fused-layers configurations each, named _fused_AGAINSTx1 but for stream")  # fmt: skip
    ap.add_argument("--fused-choice", type=fused_choice, default=[],
                    help="compiled, decoding ahead into the first --ahead slots: AGAINST:MARGIN pairs (AGAINST stream, decode or "
                         "fp16, see choose_fused), a configuration each with the layers so chosen fused, named _fused_AGAINSTxMARGIN; "
                         "e.g. fp16:1,decode:1.5")  # fmt: skip
    ap.add_argument("--fused-keep", type=lambda t: [int(x) for x in t.split(",") if x and int(x) > 0], default=[],
                    help="with --fused-layers, in the step's stream: MB of the smallest weights not fused kept decoded, a "
                         "configuration each")  # fmt: skip
    ap.add_argument("--fused-keep-by", type=lambda t: [x for x in t.split(",") if x], default=["smallest"],
                    help="with --fused-keep: which layers not fused are kept decoded, each a configuration: smallest (the "
                         "smallest layers, what the torch backend keeps), launches (whole decode kernels, the smallest first: "
                         "bf.runtime.compiled_weights.fewest_launches_within), named _keepBYMB")  # fmt: skip
    ap.add_argument("--fused-no-base", action="store_true",
                    help="with --fused-keep: of the --fused-layers configurations in the step's stream, only those that keep "
                         "weights decoded")  # fmt: skip
    ap.add_argument("--backend-fused", action="store_true",
                    help="also the torch backend's own compiled step with fused layers (TorchUNet(compile=True, fused='auto'), "
                         "what bf infer/bench --compile --fused auto run: the choice made at its first step), named "
                         "lowbit_backend_compile_graph_cl_fused, with the seconds its choice took")  # fmt: skip
    ap.add_argument("--backend-keep", type=int, default=0,
                    help="with --backend-fused: MB of the layers not fused the backend keeps decoded (bf's --keep-decoded: "
                         "whole decode kernels, the smallest first), named _keeplaunchesMB")  # fmt: skip
    ap.add_argument("--only-fused", action="store_true",
                    help="of the 1.99-bit compiled configurations, only the _fused ones (the streamed ring stays)")  # fmt: skip
    ap.add_argument("--no-in-stream", action="store_true",
                    help="compiled: skip those that decode in the step's stream (--fused-layers' _fused one stays)")  # fmt: skip
    ap.add_argument("--profile-no-fp16", action="store_true", help="--profile: of FP16, only the graphed step as measured")
    ap.add_argument("--profile-only", action="store_true", help="only the kernel profiles (writes them into --out's 'profile')")
    ap.add_argument("--profile", action="store_true", help="also break one step of the best FP16 and 1.99-bit configurations down")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="once every configuration is built, time again those replayed from the backend's CUDA graph (all but "
                         "eager and reduce-overhead) in ROUNDS interleaved rounds of --iters steps, each round in a shuffled "
                         "order (benchmarks/interleaved_timing.py); the summary's ratios are then these rounds' paired ratios, "
                         "with 95%% intervals. Holds every such configuration in GPU memory until then")  # fmt: skip
    args = ap.parse_args()
    if args.interleave == 1 or args.interleave < 0:
        ap.error(f"--interleave {args.interleave}: give 2 or more rounds (an interval needs them), or 0 to time each configuration once")
    if args.sub_blocks and args.per_layer_decode:
        ap.error("--sub-blocks splits blocks into smaller groups; with --per-layer-decode every layer is a group already")
    if args.fused_choice and not args.ahead:
        ap.error("--fused-choice configurations decode ahead: give --ahead a slot count")
    rules = args.fused_against
    if not rules or not set(rules) <= set(AGAINST) or len(set(rules)) != len(rules):
        ap.error(f"--fused-against {','.join(rules)!r}: give one or more distinct rules among stream, decode and fp16")
    if rules != ["stream"] and not args.fused_layers:
        ap.error("--fused-against applies to --fused-layers configurations: give --fused-layers")
    if args.backend_keep and not args.backend_fused:
        ap.error("--backend-keep applies to --backend-fused: give --backend-fused")
    if args.backend_keep < 0:
        ap.error(f"--backend-keep {args.backend_keep}: give MB, 0 or more")
    policies = args.fused_keep_by
    if not policies or not set(policies) <= {"smallest", "launches"} or len(set(policies)) != len(policies):
        ap.error(f"--fused-keep-by {','.join(policies)!r}: give distinct policies among smallest and launches")
    if policies != ["smallest"] and not args.fused_keep:
        ap.error("--fused-keep-by applies to --fused-keep configurations: give --fused-keep")
    if args.fused_no_base and not args.fused_keep:
        ap.error("--fused-no-base leaves only the --fused-keep configurations: give --fused-keep")
    if args.fused_keep and not args.fused_layers:
        ap.error("--fused-keep applies to --fused-layers configurations: give --fused-layers")
    if args.only_fused and not (args.fused_layers or args.fused_choice or args.backend_fused):
        ap.error("--only-fused keeps the fused configurations: give --fused-layers, --fused-choice or --backend-fused")
    # --quick: the flavour bf --compile runs (inductor's kernels in the backend's own CUDA graph) alone
    modes = [("default", "compile_graph")] if args.quick else [("reduce-overhead", "compile"), ("default", "compile_graph")]
    keeps = (0, *args.keep)
    ahead_first = args.ahead[:1]  # the slot count the variants below decode ahead into (none: no such variants)
    points = [] if args.no_in_stream else [Point(mode=mode) for mode, _ in modes]
    points += [Point(ahead=n, priority=p) for n in args.ahead for p in args.compute_priority]
    points += [Point(ahead=n, blocks=b) for n in ahead_first for b in args.decode_blocks]
    points += [] if args.no_in_stream else [Point(keep=keep) for keep in keeps[1:]]
    points += [Point(keep=keep, which="smallest", ahead=n) for n in ahead_first for keep in args.ahead_keep]
    for a in args.fused_against if args.fused_layers else ():
        points += [] if args.fused_no_base else [Point(fused=True, against=a)]
        points += [Point(keep=keep, which=by, fused=True, against=a) for by in args.fused_keep_by for keep in args.fused_keep]
        points += [Point(keep=keep, which="smallest", ahead=n, fused=True, against=a)
                   for n in ahead_first for keep in (0, *args.ahead_keep)]  # fmt: skip
    points += [Point(ahead=n, fused=True, against=a, margin=m) for n in ahead_first for a, m in args.fused_choice]
    if args.only_fused:
        points = [p for p in points if p.fused]
    names = [point_name(point, dict(modes), args.sub_blocks) for point in points]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        ap.error(f"configurations asked for twice: {', '.join(twice)} (a --fused-choice pair repeats another one)")

    from bf.cli.output import write_json
    from bf.decode_kernels import load
    from bf.runtime.backend_torch import TorchUNet, _smallest_inputs
    from bf.runtime.compiled_fused import choose_fused, fused_bytes, install_fused
    from bf.runtime.compiled_weights import (
        AHEAD_COMPILE_OPTIONS,
        compile_weights,
        decode_ahead,
        decode_launches,
        fewest_launches_within,
        packed_bytes,
    )
    from bf.runtime.streamed_weights import largest_within, smallest_within

    lib = load(args.lib)
    res: dict = run_record("benchmarks/sd15_compiled_step.py", args) | {
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"),
    }
    master, shapes, bits = sd15_mixed_unet()
    res["fp16_unet_bytes"] = sum(p.numel() * 2 for p in master.parameters())
    timesteps = torch.arange(980, -1, -20)
    b, h = args.batch, args.size // 8
    g = torch.Generator(device=DEV).manual_seed(0)
    inputs = (torch.randn(b, 4, h, h, device=DEV, generator=g).half(), torch.zeros(1, dtype=torch.long, device=DEV),
              torch.randn(b, 77, 768, device=DEV, generator=g).half())  # fmt: skip
    configs: dict = {}
    outputs: dict = {}
    checks: dict = {}
    live: dict = {}  # --interleave: name -> (its graphed step, what it runs), kept until the interleaved rounds

    def save() -> None:
        """The figures so far into --out, "complete": false (the summary once an FP16 and a 1.99-bit configuration are
        in; the kernel profiles only in the last write)."""
        if args.profile_only:  # its --out is read back at the end and merged into
            return
        res["complete"] = False
        res["configs"], res["checks"] = configs, checks
        if "best_fp16_config" in res and any(k.startswith("lowbit_") for k in configs):
            summarize(res)
        write_json(args.out, {k: v for k, v in res.items() if k != "profile"})

    def check(name: str, ref: torch.Tensor) -> None:
        """Configuration ``name``'s output against ``ref``, the same codes decoded once, run eagerly; then the figures saved."""
        diff, ref_max = (outputs[name] - ref).abs().max().item(), ref.abs().max().item()
        checks[name] = {"max_abs_diff_vs_decoded_eager": diff, "ref_max_abs": ref_max,
                        "bit_identical": bool(torch.equal(outputs[name], ref))}  # fmt: skip
        print(f"  vs the same codes decoded once, eager: max |diff| {diff:.3g} (output max {ref_max:.3g})", flush=True)
        save()

    def record(name: str, step, base: int, extra: dict | None = None, resident: int = 0, owner=None) -> None:
        from bf.runtime.torch_graph import GraphedCall

        if args.interleave and isinstance(step, GraphedCall):  # a replay stays valid after torch._dynamo.reset()
            live[name] = (step, owner)
        with torch.inference_mode():
            configs[name] = timed(lambda: step(*inputs), args.iters) | (extra or {})
            outputs[name] = step(*inputs).float().clone()
        # codes allocated before `base` (shared by the configurations of a layout) are added back
        configs[name]["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base + resident
        c = configs[name]
        warm = f", warm-up {c['warmup_s']:.1f} s (cached: {c.get('warmup_cached_s', float('nan')):.1f} s)" if "warmup_s" in c else ""
        print(f"{name}: {c['median_ms']:.3f} ms/step, peak {c['peak_mem_bytes'] / 1e9:.3f} GB{warm}", flush=True)
        save()  # (a compiled 1.99-bit one again once its check is in)

    # FP16, eager diffusers
    base = clean()
    unet = copy.deepcopy(master).to(DEV)
    t = torch.tensor(999, device=DEV)
    record("fp16_eager", lambda s, i, c, unet=unet: unet(s, t, c).sample, base)
    del unet

    if args.profile_only:  # the kernel profiles alone, merged into an existing --out
        packed = random_packed(shapes, bits, True, seed=1)
        prof = {}
        for label in ("fp16_compiled_cl", "fp16_eager_kernels_cl", "lowbit_compiled_cl"):
            model = TorchUNet(copy.deepcopy(master), timesteps, weights="fp", device=DEV, cuda_graph=False)
            if label.startswith("lowbit"):
                compile_weights(model.unet, packed, torch.float16, decoder=lib, by_block=not args.per_layer_decode)
            with torch.inference_mode():  # the default runtime: decode in the step's stream
                prof[label] = profile(model.eager_step if "eager" in label else build_step(model.eager_step, "default"), inputs)
            print_profile(label, prof[label])
            del model
            torch._dynamo.reset()
        old = json.loads(args.out.read_text()) if args.out.exists() else res
        write_timelines(args.out, res["command"], prof)
        old["profile"] = prof
        old["profile_command"] = res["command"]
        write_json(args.out, old)
        return

    layouts = (True,) if args.no_nchw else (False, True)
    for cl in layouts:
        sfx = "_cl" if cl else ""
        base = clean()
        fp16 = TorchUNet(copy.deepcopy(master), timesteps, weights="fp", device=DEV, channels_last=cl)
        record(f"fp16_graph{sfx}", fp16.step, base, owner=fp16)
        del fp16
        for mode, label in modes if cl else ():  # compiled FP16 is measured channels-last, its faster layout
            base = clean()
            fp16 = TorchUNet(copy.deepcopy(master), timesteps, weights="fp", device=DEV, channels_last=cl, cuda_graph=False)
            step = graphed_step(fp16.eager_step, mode)
            with torch.inference_mode():
                extra = {"warmup_s": warm_up(step, inputs)}
                if cl and mode == "reduce-overhead" and not args.quick:
                    torch._dynamo.reset()
                    step = graphed_step(fp16.eager_step, mode)
                    extra["warmup_cached_s"] = warm_up(step, inputs)
            record(f"fp16_{label}{sfx}", step, base, extra, owner=fp16)
            if args.profile and mode == "default":  # as measured: replayed from its graph
                with torch.inference_mode():
                    res.setdefault("profile", {})[f"fp16_{label}{sfx}_graphed"] = profile(step, inputs)
            del fp16, step
            torch._dynamo.reset()

    fp16_names = [k for k in configs if k.startswith("fp16_")]
    best_fp16 = min(fp16_names, key=lambda k: configs[k]["median_ms"])
    res["best_fp16_config"] = best_fp16
    res["best_fp16_step_ms"] = configs[best_fp16]["median_ms"]
    res["fp16_peak_mem_bytes"] = configs[best_fp16]["peak_mem_bytes"]
    print(f"fastest FP16: {best_fp16} {res['best_fp16_step_ms']:.3f} ms", flush=True)

    # 1.99 bits, channels-last (the layout FP16 is fastest in)
    packed = random_packed(shapes, bits, True, seed=1)
    codes_bytes = sum(p.codes.nbytes + p.scale.nbytes for p in packed.values())
    decoded = TorchUNet(copy.deepcopy(master), timesteps, packed, weights="decoded", device=DEV, cuda_graph=False, decoder=lib)
    with torch.inference_mode():
        ref = decoded.step(*inputs).float().clone()  # the same codes decoded once into FP16 weights, eager
    del decoded
    choices: dict = {}  # (against, margin) -> choose_fused's answer, made once on the first such configuration's model
    for keep in keeps:
        name = "lowbit_streamed_cl" + (f"_keep{keep}MB" if keep else "")
        base = clean()
        model = TorchUNet(copy.deepcopy(master), timesteps, packed, device=DEV, decoder=lib, keep_decoded_bytes=keep * 2**20)
        record(name, model.step, base, {"kept_decoded_bytes": model.kept_decoded_bytes}, resident=codes_bytes, owner=model)
        del model
    if args.backend_fused:  # as a user's process builds it: the codes grouped, the fused layers chosen at the first step
        name = "lowbit_backend_compile_graph_cl" + (f"_keeplaunches{args.backend_keep}MB" if args.backend_keep else "") + "_fused"
        base = clean()
        said: list[str] = []
        model = TorchUNet(copy.deepcopy(master), timesteps, packed, device=DEV, decoder=lib, compile=True, fused="auto",
                          keep_decoded_bytes=args.backend_keep * 2**20, log=lambda m: (said.append(m), print(m, flush=True)))  # fmt: skip
        with torch.inference_mode():
            extra = {"warmup_s": warm_up(model.step, inputs), "fused_layers": model.fused_layers,
                     "kept_decoded_bytes": model.compiled_kept_bytes}  # fmt: skip
        chose = [m for m in said if m.startswith("fused layers: ") and " compiled layers read their codes" in m]
        extra["fused_choice"] = chose[0] if chose else None  # its last words: the seconds the choice took
        # the first step's peak holds the choice's timings, with every layer's codes (allocated before `base`); the
        # figure compared is the steady step's: record's, its graph captured again (a replay allocates nothing: a peak
        # reset between replays would miss the activations)
        extra["first_step_peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base + codes_bytes
        model.release_graphs()
        torch.cuda.reset_peak_memory_stats()
        record(name, model.step, base, extra, resident=packed_bytes(model.unet), owner=model)  # fused words: allocated after `base`
        check(name, ref)
        del model
        torch._dynamo.reset()
    for (keep, which, mode, ahead, blocks, priority, fused, against, margin), name in zip(points, names, strict=True):
        priority = priority if ahead else 0  # a step in the decode's own stream is captured at the default priority
        base = clean()
        model = TorchUNet(copy.deepcopy(master), timesteps, weights="fp", device=DEV, cuda_graph=False)
        chosen = {}
        if fused:  # timed on the step's own input shapes, on the FP16 model still in place; every layer a candidate
            if (against, margin) not in choices:
                choices[against, margin] = choose_fused(model.unet, packed, lambda model=model: model.eager_step(*inputs), lib,
                                                        against, margin, log=print)  # fmt: skip
                # the words, made now and held from here on, count like the codes: resident, added back below (the
                # scales are the codes' own, allocated before `base`)
                base += sum(fw.words.nbytes for fw, _ in choices[against, margin].values())
            chosen = choices[against, margin]
            install_fused(model.unet, chosen)
        budget = keep * 2**20 // 2  # fp16 elements
        if which == "launches":
            kept = fewest_launches_within({n: p for n, p in packed.items() if n not in chosen}, budget,
                                          by_block=not args.per_layer_decode, sub_blocks=args.sub_blocks)  # fmt: skip
        else:
            within = largest_within if which == "largest" else smallest_within
            kept = within({n: p.numel for n, p in packed.items() if n not in chosen}, budget)
        if kept:
            from bf.runtime.backend_torch import _decode_quantized_weights

            _decode_quantized_weights(model.unet, {n: packed[n] for n in kept}, DEV, lib)
        rest = {n: p for n, p in packed.items() if n not in kept and n not in chosen}
        compile_weights(model.unet, rest, torch.float16, decoder=lib, by_block=not args.per_layer_decode, sub_blocks=args.sub_blocks)
        launches = decode_launches(model.unet)
        slot_bytes = 0
        if ahead:
            small = _smallest_inputs(model.unet, DEV, torch.float16)
            slot_bytes = decode_ahead(model.unet, lambda model=model, small=small: model.eager_step(*small), ahead, max_blocks=blocks)
        clean()  # the FP16 weights the compiled layers replaced are gone: they are not part of this configuration's peak
        options = AHEAD_COMPILE_OPTIONS if ahead else None
        step = graphed_step(model.eager_step, mode, options, priority)
        with torch.inference_mode():
            extra = {"warmup_s": warm_up(step, inputs), "kept_decoded_bytes": sum(2 * packed[n].numel for n in kept),
                     "kept": which if keep else "none",
                     "decode_launches": launches, "ahead_slots": ahead, "slot_bytes": slot_bytes, "decode_blocks": blocks,
                     "step_stream_priority": priority, "fused_layers": len(chosen),
                     "fused_against": against if fused else None, "fused_margin": margin if fused else None,
                     "fused_fp16_weight_bytes": sum(2 * packed[n].numel for n in chosen),
                     "fused_code_bytes": sum(fw.nbytes for fw, _ in chosen.values()),
                     "fused": {n: cfg.name for n, (_, cfg) in chosen.items()}}  # fmt: skip
            if keep == 0 and ahead == 0 and mode == "reduce-overhead" and not args.quick:
                torch._dynamo.reset()
                step = graphed_step(model.eager_step, mode)
                extra["warmup_cached_s"] = warm_up(step, inputs)
        # the codes (and the shared fused layers' words) were allocated before `base`, the slots after
        record(name, step, base, extra, resident=packed_bytes(model.unet) + fused_bytes(model.unet), owner=model)
        check(name, ref)
        first_priority = ahead == 0 or priority == args.compute_priority[0]  # (the profile runs without a graph: no priority)
        if args.profile and (keep == 0 or fused) and blocks == 0 and mode == "default" and ahead in (0, *ahead_first) and first_priority:
            with torch.inference_mode():  # as the step runs (the fused layers' op has no autograd formula)
                res.setdefault("profile", {})[name + "_graphed"] = profile(step, inputs)  # as measured
                res["profile"][name + "_no_graph"] = profile(build_step(model.eager_step, "default", options), inputs)
        del model, step, chosen
        torch._dynamo.reset()
    if args.profile and not args.profile_no_fp16:
        for label, compile_it in (("fp16_compiled_cl", True), ("fp16_eager_kernels_cl", False)):
            fp16 = TorchUNet(copy.deepcopy(master), timesteps, weights="fp", device=DEV, cuda_graph=False)
            with torch.inference_mode():
                res.setdefault("profile", {})[label] = profile(build_step(fp16.eager_step, "default") if compile_it else fp16.eager_step,
                                                               inputs)  # fmt: skip
            del fp16
            torch._dynamo.reset()
    for label, prof in res.get("profile", {}).items():
        print_profile(label, prof)
    if live:
        interleave(res, live, inputs, args.interleave, args.iters)
        live.clear()
    del packed, ref, choices
    res["complete"] = True
    res["configs"], res["checks"] = configs, checks
    summarize(res)
    headline = ("timing", "best_fp16_config", "best_fp16_step_ms", "lowbit_config", "step_ms", "ratios", "targets")
    print(json.dumps({k: res[k] for k in headline}, indent=1), flush=True)
    write_timelines(args.out, res["command"], res.get("profile", {}))  # every kernel of each profiled step, beside the figures
    write_json(args.out, res)


def interleave(res: dict, live: dict, inputs: tuple, rounds: int, iters: int) -> None:
    """The graphed configurations in ``live`` timed again in interleaved rounds, into ``res["interleaved"]``."""
    baselines = [n for n in live if n.startswith("fp16_")]
    if not baselines:
        print("interleaved rounds skipped: no FP16 configuration replayed from a CUDA graph to compare with", flush=True)
        return
    steps = {name: (lambda step=step: step(*inputs)) for name, (step, _) in live.items()}
    print(f"timing {len(steps)} configurations in {rounds} interleaved rounds of {iters} steps each", flush=True)
    with torch.inference_mode():
        per_round = interleaved_rounds(steps, rounds, iters)
    res["interleaved"] = {"rounds": rounds, "iters": iters} | interleaved_summary(per_round, baselines) | {"round_ms": per_round}
    inter = res["interleaved"]
    for name, r in inter["vs_best_baseline"].items():
        print(f"interleaved {name}: {inter['median_ms'][name]:.3f} ms/step, {r['median']:.4f}x {inter['best_baseline']} "
              f"(95% interval {r['ci95'][0]:.4f}-{r['ci95'][1]:.4f})", flush=True)  # fmt: skip


def summarize(res: dict) -> None:
    """Each configuration's ratios to the fastest FP16 (each timed once, in turn), and the fastest 1.99-bit
    configuration within 0.3x its memory (else the fastest), into ``res``. With interleaved rounds the headline
    (fastest FP16, the 1.99-bit configuration, its ratios and the targets) comes from those rounds instead, with the
    step ratio's 95% interval; ``res["timing"]`` says which."""
    configs = res["configs"]
    lowbit = [k for k in configs if k.startswith("lowbit_")]
    for k in configs:
        configs[k]["step_vs_best_fp16"] = configs[k]["median_ms"] / res["best_fp16_step_ms"]
        configs[k]["peak_mem_vs_best_fp16"] = configs[k]["peak_mem_bytes"] / res["fp16_peak_mem_bytes"]
    inter = res.get("interleaved")
    if inter:
        fp16 = inter["best_baseline"]
        step_ms, step_ratio = inter["median_ms"], {k: r["median"] for k, r in inter["vs_best_baseline"].items()}
        lowbit = [k for k in lowbit if k in step_ms]
        res.update(timing="interleaved", best_fp16_config=fp16, best_fp16_step_ms=step_ms[fp16],
                   fp16_peak_mem_bytes=configs[fp16]["peak_mem_bytes"])  # fmt: skip
    else:
        step_ms = {k: configs[k]["median_ms"] for k in configs}
        step_ratio = {k: configs[k]["step_vs_best_fp16"] for k in configs}
        res["timing"] = "sequential"
    mem_ratio = {k: configs[k]["peak_mem_bytes"] / res["fp16_peak_mem_bytes"] for k in lowbit}
    within = [k for k in lowbit if mem_ratio[k] <= 0.3]
    best = min(within or lowbit, key=step_ratio.__getitem__)
    res["lowbit_config"] = best
    res["step_ms"] = step_ms[best]
    res["peak_mem_bytes"] = configs[best]["peak_mem_bytes"]
    res["ratios"] = {"step_vs_best_fp16": step_ratio[best], "peak_mem_vs_best_fp16": mem_ratio[best]}
    res["targets"] = {"step_at_most_1.05x_best_fp16": step_ratio[best] <= 1.05,
                      "peak_mem_at_most_0.3x_best_fp16": mem_ratio[best] <= 0.3}  # fmt: skip
    if inter:
        ci = inter["vs_best_baseline"][best]["ci95"]
        res["ratios"]["step_vs_best_fp16_ci95"] = ci
        res["targets"]["step_at_most_1.05x_best_fp16_at_ci95_upper"] = ci[1] <= 1.05
    res["curve"] = [{"config": k, "step_ms": step_ms[k], "step_vs_best_fp16": step_ratio[k], "peak_mem_bytes": configs[k]["peak_mem_bytes"]}
                    for k in sorted(lowbit, key=lambda k: configs[k]["peak_mem_bytes"])]  # fmt: skip


if __name__ == "__main__":
    main()
