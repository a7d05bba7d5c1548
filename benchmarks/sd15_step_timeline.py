"""Where an SD-v1.5 step's time goes between its kernels: the kernel timelines that
``benchmarks/sd15_compiled_step.py --profile`` writes beside its JSON (<out>_timeline.json), each step
replayed from its CUDA graph as it is measured, split into what runs on the step's own chain of kernels
and what waits.

For each profiled step:

  span          the first kernel's start (after the inputs' copies into the graph) to the last one's end
  chain busy    the kernels of the step's chain (every kernel, less the decodes of a step that decodes ahead,
                which run beside it on their own stream), by category
  launch gaps   the chain's gaps under 3 us (a graph's kernel-to-kernel latency)
  waits         the chain's gaps of 3 us and more; "on a decode": those that end within 4 us of a decode's end
                (the step waited for the weights it needed next)

and, against the first FP16 step in the file, the difference of each. A plot of the chains and decodes of
the FP16 step and each 1.99-bit step goes beside the JSON (--plot).

Each 1.99-bit step with fused low-bit kernels is also set beside the FP16 step layer by layer (``fused_layers``):
both steps run the UNet's convolutions and linear layers in the same order, one kernel each (cuDNN's workspace
kernel counted with the convolution after it, its padding kernels with the convolution beside them, the fused
kernel's split-K sum with the kernel before it), so the n-th layer kernel of one is the n-th of the other.
Listed: every layer the fused kernel runs, its time against the FP16 kernel's, and the sum of the differences (what
the fused layers cost or save the step, their decodes aside).

    python benchmarks/sd15_step_timeline.py results/sd15_compiled_step_profile_timeline.json \\
        --out results/sd15_step_timeline.json --plot results/sd15_step_timeline.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAIT_US = 3.0  # a gap at least this long is a wait, not a graph's launch latency (FP16's are 0.4-0.7 us)
ON_DECODE_US = 4.0  # a wait that ends this close after a decode's end waited for it
# A profile label naming a step that decodes ahead: its decodes run beside its chain. Told by the label, since the
# stream ids of a replayed graph are the graph's own, which hold the chain's kernels and the decodes alike.
AHEAD = "ahead"

# Kernel name patterns, first match wins (the profiles' categories).
CATEGORIES = [
    ("fused (triton)", r"^triton_"),  # inductor's kernels, whose names list what they fused ("convolution" included)
    ("low-bit kernel", r"^_lowbit_conv_kernel|^_wgmma_lowbit_kernel|^_split_sum_kernel"),  # the fused kernels (compiled_fused)
    ("decode", r"bf::|decode_kernel|lowbit"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    # cuDNN's convolutions are implicit GEMMs (before gemm), with a workspace kernel of cuDNN's (cask_plugin)
    ("conv", r"fprop|implicit_gemm|nhwckrsc|conv|winograd|dgrad|cask_plugin"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|matmul|splitK"),
    ("layout copy", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
    ("norm", r"norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|copy|fill|cat"),
]


# Kernels that belong to a layer kernel beside them: cuDNN's workspace kernel runs right before its convolution,
# its padding kernel before (the input's) or after (the output's), the fused kernel's split-K sum and cuBLAS's
# split-K reduction after theirs.
BEFORE_LAYER = r"init_device_workspace"
BESIDE_LAYER = r"AddPadding"  # the layer kernel next to it if that is one, else the one before
AFTER_LAYER = r"_split_sum_kernel|splitKreduce"


def kernel_category(name: str) -> str:
    return next((c for c, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")


def write_timelines(out: Path, command: str, profiles: dict) -> None:
    """Each profile's ``timeline`` moved out of ``profiles`` into ``<out>_timeline.json`` beside ``out``: compact (a step
    is some 800 kernels), written atomically; nothing where no profile has one."""
    from bf.atomic import atomic_path

    timelines = {label: prof.pop("timeline") for label, prof in profiles.items() if "timeline" in prof}
    if not timelines:
        return
    path = out.with_name(out.stem + "_timeline.json")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"command": command, "timeline": timelines}, separators=(",", ":")) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def step_kernels(kernels: list) -> list:
    """A profiled step's kernels from its first one after the inputs' copies into the graph (and the graph's launch)."""
    first = next((i for i, k in enumerate(kernels) if not k[3].startswith("Memcpy")), len(kernels))
    return kernels[first:]


def span_ms(kernels: list) -> float:
    """From the first kernel's start to the last one's end (``kernels`` in start order, as step_kernels gives them)."""
    return (max(k[0] + k[1] for k in kernels) - kernels[0][0]) / 1e3 if kernels else 0.0


def _beside(label: str, kernel: list) -> bool:
    return AHEAD in label and kernel_category(kernel[3]) == "decode"


def split(label: str, kernels: list) -> dict:
    """One step's timeline ([start us, duration us, stream, name], in start order) split as the docstring says."""
    kernels = step_kernels(kernels)
    if not kernels:
        raise ValueError(f"{label}: no kernel after the inputs' copies")
    side, chain = [], []
    for k in kernels:
        (side if _beside(label, k) else chain).append(k)
    busy: dict[str, float] = {}
    for k in chain:
        category = kernel_category(k[3])
        busy[category] = busy.get(category, 0.0) + k[1] / 1e3
    launch = waits = on_decode = 0.0
    decode_ends = [k[0] + k[1] for k in side]
    for a, b in itertools.pairwise(chain):
        gap = b[0] - (a[0] + a[1])
        if gap < WAIT_US:
            launch += max(gap, 0.0)
            continue
        waits += gap
        if any(0 <= b[0] - end <= ON_DECODE_US for end in decode_ends):
            on_decode += gap
    return {
        "span_ms": span_ms(kernels),
        "chain_kernels": len(chain),
        "chain_busy_ms": sum(busy.values()),
        "chain_busy_by_category_ms": dict(sorted(busy.items(), key=lambda kv: -kv[1])),
        "launch_gaps_ms": launch / 1e3,
        "waits_ms": waits / 1e3,
        "waits_on_a_decode_ms": on_decode / 1e3,
        "side_decode_ms": sum(k[1] for k in side) / 1e3,
        "side_decodes": len(side),
    }


def _is_layer(name: str) -> bool:
    return kernel_category(name) in ("conv", "gemm", "low-bit kernel") and not re.search(
        f"{BEFORE_LAYER}|{BESIDE_LAYER}|{AFTER_LAYER}", name
    )


def layer_kernels(kernels: list) -> list[tuple[str, float]]:
    """A step's layer kernels in order (convolution, matrix product or fused low-bit kernel), (name, us) each, with
    the helper kernels that belong to each one (BEFORE_LAYER, BESIDE_LAYER, AFTER_LAYER) added to its time."""
    kernels = step_kernels(kernels)
    layers: list[list] = []
    pending = 0.0  # helpers' time waiting for the layer kernel after them
    for i, k in enumerate(kernels):
        name = k[3]
        after = re.search(AFTER_LAYER, name) or (
            re.search(BESIDE_LAYER, name) and not (i + 1 < len(kernels) and _is_layer(kernels[i + 1][3]))
        )
        if after and layers:
            layers[-1][1] += k[1]
        elif re.search(f"{BEFORE_LAYER}|{BESIDE_LAYER}", name):
            pending += k[1]
        elif _is_layer(name):
            layers.append([name, k[1] + pending])
            pending = 0.0
    return [(name, us) for name, us in layers]


def fused_layers(fp16: list, lowbit: list) -> dict | None:
    """The layers a 1.99-bit step runs on the fused kernel, against the FP16 step's kernel for the same layer (see the
    docstring); None where the two steps do not run as many layer kernels (then they cannot be paired)."""
    a, b = layer_kernels(fp16), layer_kernels(lowbit)
    if len(a) != len(b):
        return None
    rows = [{"layer": i, "fp16_kernel": x[0][:60], "fp16_us": x[1], "fused_us": y[1], "diff_us": y[1] - x[1]}
            for i, (x, y) in enumerate(zip(a, b, strict=True)) if kernel_category(y[0]) == "low-bit kernel"]  # fmt: skip
    return {"layers": len(a), "fused": len(rows), "fused_us": sum(r["fused_us"] for r in rows),
            "fp16_us": sum(r["fp16_us"] for r in rows), "diff_us": sum(r["diff_us"] for r in rows),
            "slower": sum(r["diff_us"] > 0 for r in rows), "rows": rows}  # fmt: skip


def plot(path: Path, timelines: dict[str, list], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"conv": "tab:blue", "gemm": "tab:orange", "attention": "tab:green", "fused (triton)": "tab:gray",
              "decode": "tab:red", "low-bit kernel": "tab:purple"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(14, 0.9 * len(labels) + 1.2))
    for row, label in enumerate(labels):
        kernels = step_kernels(timelines[label])
        t0 = kernels[0][0]
        for k in kernels:
            off_chain = _beside(label, k)
            y = row + (0.42 if off_chain else 0.0)
            ax.broken_barh([((k[0] - t0) / 1e3, k[1] / 1e3)], (y - 0.18, 0.36 if not off_chain else 0.2),
                           color=colors.get(kernel_category(k[3]), "black"), linewidth=0)  # fmt: skip
    ax.set_yticks(range(len(labels)), [label.removesuffix("_graphed") for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms from the step's first kernel (one step, replayed from its CUDA graph, under the profiler)")
    ax.set_title("One UNet step each: its chain of kernels, and the decodes beside it (the thin row below) where it decodes ahead",
                 fontsize=9)  # fmt: skip
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=7, ncol=len(colors), loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("timeline", type=Path, help="a timeline JSON of sd15_compiled_step.py --profile")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    ap.add_argument("--plot", type=Path, default=None, help="write a plot of the graphed steps' timelines here (PNG)")
    args = ap.parse_args()
    from bf.cli.output import write_json
    from bf.errors import BfError

    try:
        data = json.loads(args.timeline.read_text())
        timelines = data["timeline"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {args.timeline} is not a timeline that sd15_compiled_step.py --profile wrote ({e})") from None
    labels = [label for label in timelines if label.endswith("_graphed") and step_kernels(timelines[label])]
    if not labels:
        raise SystemExit(f"error: {args.timeline} holds no step replayed from its graph (labels ending _graphed)")
    fp16 = next((label for label in labels if label.startswith("fp16")), None)
    steps = {label: split(label, timelines[label]) for label in labels}
    keys = ("span_ms", "chain_busy_ms", "launch_gaps_ms", "waits_ms", "waits_on_a_decode_ms", "side_decode_ms")
    print(f"{'step (graphed, profiled)':44s}" + "".join(f"{k.removesuffix('_ms'):>22s}" for k in keys))
    for label, s in steps.items():
        if fp16 and label != fp16:
            s["vs_fp16_ms"] = {k: s[k] - steps[fp16][k] for k in keys}
        diff = s.get("vs_fp16_ms", {})
        cells = "".join(f"{s[k]:>13.3f}" + (f" ({diff[k]:+.3f})" if k in diff else " " * 9) for k in keys)
        print(f"{label.removesuffix('_graphed'):44s}{cells}")
    for label in steps if fp16 else ():
        paired = fused_layers(timelines[fp16], timelines[label]) if label != fp16 else None
        if paired is None and label != fp16:
            print(f"{label.removesuffix('_graphed')}: its layer kernels do not pair with {fp16}'s (not as many): no per-layer "
                  "comparison")  # fmt: skip
        if paired and paired["fused"]:
            steps[label]["fused_layers"] = paired
            print(f"{label.removesuffix('_graphed')}: {paired['fused']} of {paired['layers']} layers fused, "
                  f"{paired['fused_us']:.1f} us against FP16's {paired['fp16_us']:.1f} us for them ({paired['diff_us']:+.1f} us; "
                  f"{paired['slower']} slower)")  # fmt: skip
            for r in paired["rows"]:
                print(f"  layer {r['layer']:3d}  {r['fp16_kernel'][:40]:40s} {r['fp16_us']:7.1f} us  fused {r['fused_us']:7.1f} us "
                      f"({r['diff_us']:+.1f})")  # fmt: skip
    if args.out:
        try:
            write_json(args.out, {"command": "python benchmarks/sd15_step_timeline.py " + " ".join(sys.argv[1:]),
                                  "source": data.get("command"), "wait_us": WAIT_US, "on_decode_us": ON_DECODE_US,
                                  "baseline": fp16, "steps": steps})  # fmt: skip
        except BfError as e:
            raise SystemExit(f"error: {e}") from None
    if args.plot:
        plot(args.plot, timelines, labels)


if __name__ == "__main__":
    main()
