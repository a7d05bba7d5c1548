"""Human-readable tables for the CLI (JSON output is the summary dict itself)."""

from __future__ import annotations

from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def format_summary(s: dict, path: Path, show_layers: bool = False) -> str:
    lines = [f"{path}  (format {s['format_version']}{', bundled' if s['bundled'] else ''})"]
    if show_layers:
        lines.append(f"{'layer':<58} {'shape':<20} {'bits':>4} {'lvls':>4} {'bytes':>10} {'bits/w':>7}")
        for r in s["layers"]:
            shape = "x".join(map(str, r["shape"]))
            lines.append(
                f"{r['name']:<58} {shape:<20} {r['bits']:>4} {r['levels']:>4} {r['stored_bytes']:>10,} {r['code_bits_per_weight']:>7.3f}"
            )
        lines.append("")
    lines.append(f"{'bits':>4} {'grid':<9} {'layers':>6} {'params':>14} {'paper b/w':>9} {'stored b/w':>10}")
    for w in s["by_width"]:
        lines.append(
            f"{w['bits']:>4} {w['grid']:<9} {w['layers']:>6} {w['params']:>14,} "
            f"{w['paper_bits_per_weight']:>9.3f} {w['code_bits_per_weight']:>10.4f}"
        )
    lines += [
        "",
        f"quantized params      {s['quantized_params']:,} of {s['unet_params']:,} UNet params"
        + ("   (an SDXL UNet)" if s.get("family") == "sdxl" else ""),
        f"avg bits (paper)      {s['avg_bits']:.3f}   (incl. a {s['avg_bits_time_table_steps']}-step time table)",
        f"stored bits/weight    {s['stored_bits_per_weight']:.4f}   (codes and scales)",
        f"UNet packed           {_mb(s['unet_bytes'])}   (FP16: {_mb(s['fp16_bytes'])}, {s['ratio_vs_fp16']:.2f}x smaller)",
        f"time layers (FP32)    {_mb(s['time_layers_bytes'])}   (replaced by a {_mb(s['time_table_bytes'])} table at export)",
    ]
    if s.get("file_bytes") is not None:
        lines.append(f"file                  {_mb(s['file_bytes'])}")
    return "\n".join(lines)


def format_eval_table(results: list[dict], differences: list[dict] | None = None) -> str:
    """Per model, CFG scale and split: overall accuracy with its 95% interval, each attribute, PSNR and MSE against
    the reference, and the Fréchet distance to rendered ground truth (bf.evaluate.frechet);
    then the paired differences of overall accuracy between models, with their intervals."""
    attrs = ["count", "color", "shape", "size", "position", "relation"]
    head = (f"{'model':<24} {'cfg':>4} {'split':<11} {'overall':>7} {'95% CI':>13} " + " ".join(f"{a[:8]:>8}" for a in attrs)
            + f" {'psnr':>7} {'mse':>9} {'fd':>7}")  # fmt: skip
    lines = [head]
    for r in results:
        acc = r.get("accuracy") or {}
        cells = " ".join(f"{acc[a]:>8.3f}" if a in acc else f"{'-':>8}" for a in attrs)
        psnr = f"{r['psnr']:>7.2f}" if r.get("psnr") is not None else f"{'inf' if 'psnr' in r else '-':>7}"  # null in JSON: identical
        mse = f"{r['mse']:>9.2e}" if "mse" in r else f"{'-':>9}"
        overall = f"{acc['overall']:>7.3f}" if "overall" in acc else f"{'-':>7}"
        ci = f"[{r['accuracy_ci95'][0]:.2f}, {r['accuracy_ci95'][1]:.2f}]" if "accuracy_ci95" in r else "-"
        fd = f"{r['fd_rendered']:>7.2f}" if "fd_rendered" in r else f"{'-':>7}"
        lines.append(f"{r['model'][:24]:<24} {r['cfg']:>4} {r['split']:<11} {overall} {ci:>13} {cells} {psnr} {mse} {fd}")
    if differences:
        lines += ["", "overall accuracy, b - a, paired on the same prompts and seeds (95% CI):"]
        for d in differences:
            lines.append(f"  cfg {d['cfg']:<4} {d['split']:<11} {d['b'][:24]} - {d['a'][:24]}: {d['difference']:+.3f} "
                         f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")  # fmt: skip
    return "\n".join(lines)


def save_eval_grid(path: Path, sets, generated, models, reference, cfg) -> None:
    """Rows: every prompt evaluated; columns: the reference, then each other model, at each CFG scale (first seed).

    A model that is also the reference has one column, the reference's."""
    from bf.evaluate.evaluation import split_seeds
    from bf.evaluate.image_grid import save_grid

    shown = ([reference] if reference is not None else []) + [m for m in models if reference is None or m.pipe is not reference.pipe]
    columns = [(m, scale) for m in shown for scale in cfg.cfgs]
    rows, cells = [], []
    for ps in sets:
        for i, prompt in enumerate(ps.prompts):
            rows.append(f"[{ps.split}] {prompt}")
            cells.append([generated[(m.label, scale, ps.split)].images[i * len(split_seeds(cfg, len(ps.prompts)))]
                          for m, scale in columns])  # fmt: skip
    save_grid(path, rows, [f"{m.label}\ncfg {scale:g}" for m, scale in columns], cells)


def format_allocation(recipe: dict, out: Path) -> str:
    """Histogram of an allocated recipe and both averages (what ``bf allocate`` prints)."""
    lines = [f"{'bits':>4} {'layers':>7} {'params':>12} {'share':>7}"]
    for h in recipe["histogram"]:
        lines.append(f"{h['bits']:>4} {h['layers']:>7} {h['params']:>12,} {100 * h['share']:>6.1f}%")
    lines.append(
        f"average {recipe['avg_bits']:.4f} bits (paper's count, target {recipe['target_bits']}), "
        f"{recipe['stored_bits_per_weight']:.4f} stored bits/weight; eta {recipe['eta']}, "
        f"{recipe['semantic_refined_layers']} layers raised for semantic drop"
    )
    lines.append(f"wrote {out}")
    return "\n".join(lines)
