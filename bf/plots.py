"""Figures (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path

from bf.atomic import atomic_path


def plot_analysis(analysis: dict, path: Path) -> None:
    """The paper's Figure 2: per-layer MSE and semantic drop at each analysed width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(analysis["layers"])
    widths = sorted({int(b) for rec in analysis["layers"].values() for b in rec["bits"]})
    fig, (ax_mse, ax_sem) = plt.subplots(2, 1, figsize=(max(8, len(names) / 16), 6), sharex=True)
    for b in widths:
        x = [i for i, n in enumerate(names) if str(b) in analysis["layers"][n]["bits"]]
        recs = [analysis["layers"][names[i]]["bits"][str(b)] for i in x]
        ax_mse.plot(x, [max(r["mse"], 1e-12) for r in recs], ".-", lw=0.6, ms=3, label=f"{b} bit")
        ax_sem.plot(x, [r["semantic_drop"] for r in recs], ".-", lw=0.6, ms=3, label=f"{b} bit")
    ax_mse.set_yscale("log")
    ax_mse.set_ylabel("pixel MSE vs FP")
    ax_sem.set_ylabel("accuracy drop vs FP")
    ax_sem.set_xlabel("layer (UNet order)")
    ax_mse.legend(ncol=len(widths), fontsize=8)
    ax_mse.set_title(f"one layer quantized at a time ({len(names)} layers)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_bench(result: dict, path: Path) -> None:
    """bf bench --plot: deployed size per graph and latency per stage, quantized next to its baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [("quantized", result["quantized"])] + ([("baseline", result["baseline"])] if result.get("baseline") else [])
    graphs = list(runs[0][1]["sizes"]["graph_bytes"])
    stages = list(runs[0][1]["run"]["stages"])
    fig, (ax_size, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(runs)
    for i, (label, r) in enumerate(runs):
        sizes = [(r["sizes"]["engine_bytes"] or r["sizes"]["graph_bytes"]).get(g, 0) / 1e6 for g in graphs]
        bars = ax_size.bar(np.arange(len(graphs)) + i * width, sizes, width, label=label)
        ax_size.bar_label(bars, fmt="%.1f", fontsize=7)
        times = [r["run"]["stages"].get(s, {}).get("median_ms", 0) for s in stages]
        bars = ax_time.bar(np.arange(len(stages)) + i * width, times, width, label=label)
        ax_time.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_size.set_xticks(np.arange(len(graphs)) + width * (len(runs) - 1) / 2, [g.replace("_", " ") for g in graphs])
    ax_size.set_ylabel("deployed size (MB)")
    ax_time.set_xticks(np.arange(len(stages)) + width * (len(runs) - 1) / 2, [s.replace("_", " ") for s in stages], rotation=15)
    ax_time.set_ylabel("median latency (ms)")
    ax_size.legend()
    fig.suptitle(f"bf bench: {result['backend']} on {result['device']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
