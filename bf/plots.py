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
