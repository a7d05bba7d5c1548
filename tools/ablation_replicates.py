"""The ablation's effects across training runs: how much of a row-to-row difference survives training the rows again.

Each ``tools/ablation.py`` table is one training run of every row (GPU training is not bit-reproducible, so the same
command and seed give different models), and its intervals cover the evaluation only. Given several tables of the same
rows, this reads each technique's paired difference (the row minus the row it adds to, and minus its same-budget
control) from every run, and gives:

- the mean over runs with a 95% t-interval over runs: training and evaluation noise together, the variance the
  per-run intervals leave out (a run is one draw of both);
- the spread between runs (their standard deviation) next to each run's own evaluation interval, so that one can see
  which of the two dominates;
- a verdict: "holds" where every run's interval excludes 0 on the same side and the interval over runs does too,
  "reversed" the same the other way round, otherwise "not shown".

    python tools/ablation_replicates.py results/ablation.json results/ablation_run_a.json results/ablation_200_images.json \\
        --cfg 7.5 --json results/ablation_replicates.json --plot results/ablation_replicates.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bf.cli.output import write_json
from bf.errors import BfError

# Student's t, 97.5% quantile, by degrees of freedom: a 95% two-sided interval over a handful of runs
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom, or the tabulated df next below (never
    narrower than the true interval)."""
    if df < 1:
        raise BfError("an interval over runs needs two runs or more")
    return T975[max(d for d in T975 if d <= df)]


def load_run(path: Path, cfg: str) -> dict:
    try:
        run = json.loads(path.read_text())
    except FileNotFoundError:
        raise BfError(f"{path}: no such file; give tools/ablation.py --json tables") from None
    except json.JSONDecodeError as e:
        raise BfError(f"{path} is not JSON ({e.msg}, line {e.lineno}); give tools/ablation.py --json tables") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BfError(f"{path} cannot be read ({type(e).__name__}); give tools/ablation.py --json tables") from None
    rows = run.get("rows") if isinstance(run, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "key" in r and isinstance(r.get("cfg"), dict) for r in rows):
        raise BfError(f"{path} is not a tools/ablation.py table (no rows, each with its key and cfg)")
    if not any(cfg in r.get("cfg", {}) for r in run["rows"]):
        have = sorted({c for r in run["rows"] for c in r.get("cfg", {})})
        raise BfError(f"{path} has no evaluation at CFG {cfg} (it has {', '.join(have) or 'none'}); pick --cfg from those")
    return run


def effects(runs: list[dict], cfg: str) -> list[dict]:
    """Every (row, comparison) that all runs measured: each run's difference and interval, and the figures over runs."""
    keys = [r["key"] for r in runs[0]["rows"]]
    labels = {r["key"]: r["row"] for r in runs[0]["rows"]}
    out = []
    for key in keys:
        for against in ("previous", "fp_control"):
            per_run = []
            for run in runs:
                row = next((r for r in run["rows"] if r["key"] == key), None)
                d = (row or {}).get("differences", {}).get(against)
                if not isinstance(d, dict) or not isinstance(d.get(cfg), dict) or not {"difference", "ci95"} <= d[cfg].keys():
                    break
                per_run.append({"other": d["row"], "difference": d[cfg]["difference"], "ci95": d[cfg]["ci95"]})
            if len(per_run) != len(runs) or len({p["other"] for p in per_run}) != 1:
                continue  # not measured in every run, or against different rows
            if any(e["row"] == key and e["other"] == per_run[0]["other"] for e in out):
                continue  # a row without Stage II: its control is the FP model, already its row before
            values = [p["difference"] for p in per_run]
            n = len(values)
            mean = sum(values) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            half = t975(n - 1) * sd / math.sqrt(n)
            lo, hi = mean - half, mean + half
            if all(p["ci95"][0] > 0 for p in per_run) and lo > 0:
                verdict = "holds"
            elif all(p["ci95"][1] < 0 for p in per_run) and hi < 0:
                verdict = "reversed"
            else:
                verdict = "not shown"
            eval_half = [(p["ci95"][1] - p["ci95"][0]) / 2 for p in per_run]
            out.append({
                "row": key, "label": labels[key], "against": against, "other": per_run[0]["other"], "runs": per_run,
                "mean": mean, "sd_over_runs": sd, "ci95_over_runs": [lo, hi], "mean_eval_half_width": sum(eval_half) / n,
                "verdict": verdict,
            })  # fmt: skip
    return out


def plot(result: dict, out: Path) -> None:
    """Each technique's difference against the row it adds to: every run's with its evaluation interval, and the
    mean over runs with its interval over runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [e for e in result["effects"] if e["against"] == "previous"]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(shown) + 1.6))
    names = [Path(p).stem for p in result["runs"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, e in enumerate(shown):
        y = len(shown) - i
        for j, r in enumerate(e["runs"]):
            yy = y + 0.12 * (j - (len(e["runs"]) - 1) / 2)
            ax.errorbar(r["difference"], yy, xerr=[[r["difference"] - r["ci95"][0]], [r["ci95"][1] - r["difference"]]], fmt="o",
                        ms=4, color=colors[j % len(colors)], label=names[j] if i == 0 else None, alpha=0.8)  # fmt: skip
        lo, hi = e["ci95_over_runs"]
        label = "mean over runs, 95% t-interval" if i == 0 else None
        ax.plot([lo, hi], [y - 0.32] * 2, color="black", lw=3, solid_capstyle="butt", label=label)
        ax.plot(e["mean"], y - 0.32, "k|", ms=10)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks([len(shown) - i for i in range(len(shown))], [f"{e['label'][:48]}\n({e['verdict']})" for e in shown], fontsize=8)
    ax.set_xlabel(f"accuracy minus the row before, CFG {result['cfg']} (paired, 95%)")
    ax.set_title("The ablation's effects across training runs", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="+", type=Path, help="tools/ablation.py --json tables, one per training run (two or more)")
    p.add_argument("--cfg", default="7.5", help="the guidance scale every table was evaluated at (default 7.5)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    args = p.parse_args()
    try:
        if len(args.tables) < 2:
            raise BfError("give two or more tables: an interval over runs needs two runs or more")
        same = [t for i, t in enumerate(args.tables) if t.resolve() in {u.resolve() for u in args.tables[:i]}]
        if same:
            raise BfError(f"{same[0]} is given twice: each table must be a different training run")
        runs = [load_run(t, args.cfg) for t in args.tables]
        texts = [json.dumps(r["rows"], sort_keys=True) for r in runs]
        twins = [(args.tables[j], args.tables[i]) for i in range(len(texts)) for j in range(i) if texts[i] == texts[j]]
        if twins:
            raise BfError(f"{twins[0][0]} and {twins[0][1]} hold the same rows: each table must be a different training run")
        for field in ("steps", "rows", "batch_size", "lr", "images"):  # the training should match; evaluations may differ
            values = {json.dumps(r.get("settings", {}).get(field)) for r in runs}
            if len(values) > 1:
                print(f"warning: the tables were trained with different {field} ({', '.join(sorted(values))}): "
                      "their spread is not training noise alone", file=sys.stderr)  # fmt: skip
        found = effects(runs, args.cfg)
        if not found:
            raise BfError("no row's difference is in every table at that CFG; were they made with the same --rows?")
    except BfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    result = {
        "cfg": args.cfg,
        "runs": [str(t) for t in args.tables],
        "settings": [r["settings"] for r in runs],
        "intervals": "per run: evaluation only (tools/ablation.py); over runs: mean +- t(0.975, n-1) * sd / sqrt(n)",
        "effects": found,
        "command": " ".join(["python", "tools/ablation_replicates.py", *sys.argv[1:]]),
    }
    print(f"{'row':<52} {'against':<11} {'each run':<26} {'mean [95% over runs]':<28} {'sd':>6} {'eval +-':>8}  verdict")
    for e in found:
        each = " / ".join(f"{r['difference']:+.3f}" for r in e["runs"])
        lo, hi = e["ci95_over_runs"]
        print(f"{e['label'][:52]:<52} {e['other']:<11} {each:<26} {e['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]{'':<6} {e['sd_over_runs']:6.3f} "
              f"{e['mean_eval_half_width']:8.3f}  {e['verdict']}")  # fmt: skip
    if args.json:
        write_json(args.json, result)  # atomically, its directory made
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
