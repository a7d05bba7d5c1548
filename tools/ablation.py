"""The ablation table (the paper's Table 4, on the shipped model).

Every row is one ``bf train`` command with the same number of training steps; each
adds one technique to the row above. All rows are evaluated with ``bf eval`` against
the FP model at CFG 3.5/5.5/7.5/9.5, and the table is written as JSON and a plot.

    python tools/ablation.py --work W --recipe recipe.json --steps 800 --phase all

Phases (each reuses what the earlier ones left in --work, so they can run on different
days or machines): ``train`` (rows in parallel processes: one process leaves a GPU
mostly idle with this small model), ``eval`` (one process per row), ``table``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

from bf.errors import BfError
from bf.processes import run_commands

CFGS = (3.5, 5.5, 7.5, 9.5)
ABLATE = ["--no-feature-distill", "--timesteps", "uniform", "--no-stage2"]


def rows(recipe: Path, steps: int) -> list[tuple[str, str, list[str] | None]]:
    """(key, label, bf train arguments); None: the FP model itself."""
    mixed = ["--recipe", str(recipe)]
    return [
        ("fp", "FP model", None),
        ("lsq2", "LSQ 2-bit (plain grid, min-max init)", ["--uniform-bits", "2", "--grid", "plain", "--init", "minmax", *ABLATE]),
        ("balance", "+ balanced grid", ["--uniform-bits", "2", "--init", "minmax", *ABLATE]),
        ("altinit", "+ alternating scale init", ["--uniform-bits", "2", *ABLATE]),
        ("mixed", "+ mixed precision 1.99 bits", [*mixed, *ABLATE]),
        ("feature", "+ feature distillation", [*mixed, "--timesteps", "uniform", "--no-stage2"]),
        ("beta", "+ Beta(3,1) timesteps", [*mixed, "--no-stage2"]),
        ("stage2", "+ Stage II (same budget: half Stage I, half Stage II)", [*mixed, "--stage2-steps", str(steps // 2)]),
        ("stage2x", "+ Stage II after a full Stage I (1.5x budget)", [*mixed, "--stage2-steps", str(steps // 2)]),
    ]


def stage1_steps(key: str, steps: int) -> int:
    return steps - steps // 2 if key == "stage2" else steps


def bf(*args: str) -> list[str]:
    return [sys.executable, "-m", "bf.cli", *args]


def run_parallel(jobs: dict[str, list[str]], work: Path, parallel: int, what: str) -> dict[str, float]:
    """Run commands, at most ``parallel`` at once; seconds per job; exits on the first failure."""
    try:
        return run_commands(
            jobs,
            {key: work / f"{key}.{what}.log" for key in jobs},
            parallel,
            on_event=lambda key, event, s: print(f"[{what}] {key} {event}" + (f" in {s:.0f}s" if event == "done" else ""), flush=True),
            failure=lambda key, line, log: f"[{what}] {key} failed: {line} (log: {log})",
            extra_env={"PYTHONWARNINGS": "ignore"},
        )
    except BfError as e:
        sys.exit(str(e))


def train(args, table_rows) -> None:
    jobs = {}
    for key, _, extra in table_rows:
        out = args.work / f"{key}.bfq"
        if extra is None or out.exists() or (args.rows and key not in args.rows.split(",")):
            continue
        jobs[key] = bf(
            "train", *extra, "--stage1-steps", str(stage1_steps(key, args.steps)), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--images", str(args.images), "--seed", str(args.seed), "--checkpoint-every", str(max(1, args.steps)),
            "--out", str(out), *(["--resume"] if (args.work / f"{key}.bfq.work" / "state.safetensors").exists() else []),
        )  # fmt: skip
    seconds = run_parallel(jobs, args.work, args.parallel, "train")
    times = json.loads((args.work / "train_seconds.json").read_text()) if (args.work / "train_seconds.json").exists() else {}
    (args.work / "train_seconds.json").write_text(json.dumps({**times, **seconds}, indent=1))


def evaluate(args, table_rows) -> None:
    jobs = {}
    for key, _, extra in table_rows:
        out = args.work / f"{key}.eval.json"
        if out.exists() or (args.rows and extra is not None and key not in args.rows.split(",")):
            continue
        model = "shipped" if extra is None else str(args.work / f"{key}.bfq")
        jobs[key] = bf(
            "eval", "--model", model, "--reference", "shipped", "--cfg", ",".join(map(str, CFGS)), "--seeds", str(args.seeds),
            "--batch-size", str(args.eval_batch), "--json", str(out), *(["--limit", str(args.limit)] if args.limit else []),
        )  # fmt: skip
    run_parallel(jobs, args.work, args.parallel, "eval")


def _per_cfg(results: list[dict]) -> dict[str, dict]:
    """Accuracy over all images of a CFG scale (the splits weighted by images) and PSNR of their mean MSE."""
    out = {}
    for cfg in CFGS:
        rs = [r for r in results if r["cfg"] == cfg]
        n = sum(r["images"] for r in rs)
        mse = sum(r["mse"] * r["images"] for r in rs) / n
        out[str(cfg)] = {
            "accuracy": sum(r["accuracy"]["overall"] * r["images"] for r in rs) / n,
            "psnr": None if mse == 0 else 10 * math.log10(1 / mse),
            "splits": {r["split"]: {"accuracy": r["accuracy"]["overall"], "psnr": r["psnr"], "images": r["images"]} for r in rs},
        }
    return out


def _final_losses(log_csv: Path) -> dict:
    last = {}
    with open(log_csv) as f:
        for row in csv.DictReader(f):
            last[row["stage"]] = {"step": int(row["step"]), "loss": float(row["loss"]), "seconds": float(row["seconds"])}
    return last


def _inspect(bfq: Path) -> dict:
    return json.loads(subprocess.run(bf("inspect", "--json", str(bfq)), capture_output=True, text=True, check=True).stdout)


def table(args, table_rows) -> dict:
    times = json.loads((args.work / "train_seconds.json").read_text()) if (args.work / "train_seconds.json").exists() else {}
    out_rows = []
    for key, label, extra in table_rows:
        if args.rows and extra is not None and key not in args.rows.split(","):
            continue
        ev = json.loads((args.work / f"{key}.eval.json").read_text())
        row = {"row": label, "key": key, "command_args": extra}
        if extra is None:
            row.update(avg_bits=16.0, stored_bytes=_inspect(args.work / "mixed.bfq")["fp16_bytes"])
        else:
            info = _inspect(args.work / f"{key}.bfq")
            row.update(avg_bits=info["avg_bits"], stored_bytes=info["unet_bytes"], stored_bits_per_weight=info["stored_bits_per_weight"])
            row["training"] = {"seconds": times.get(key), "final": _final_losses(args.work / f"{key}.bfq.work" / "log.csv")}
        row["cfg"] = _per_cfg(ev["results"])
        out_rows.append(row)
    fp = {c: out_rows[0]["cfg"][str(c)]["accuracy"] for c in CFGS}
    for row in out_rows:
        for c in CFGS:
            row["cfg"][str(c)]["accuracy_vs_fp"] = row["cfg"][str(c)]["accuracy"] / fp[c] if fp[c] else None
    result = {
        "rows": out_rows,
        "settings": {
            "steps": args.steps, "rows": args.rows, "batch_size": args.batch_size, "lr": args.lr, "images": args.images, "seed": args.seed,
            "eval": {"cfgs": CFGS, "seeds": args.seeds, "limit": args.limit, "sampler": "PNDM, 50 steps", "reference": "FP model"},
        },
        "command": " ".join(["python", "tools/ablation.py", *sys.argv[1:]]),
    }  # fmt: skip
    return result


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for row in result["rows"]:
        acc = [row["cfg"][str(c)]["accuracy"] for c in CFGS]
        style = "k--" if row["key"] == "fp" else "-o"
        a1.plot(CFGS, acc, style, label=f"{row['row']} ({row['avg_bits']:.2f} bits)")
        if row["key"] != "fp":
            a2.plot(CFGS, [row["cfg"][str(c)]["psnr"] for c in CFGS], "-o", label=row["row"])
    a1.set(xlabel="CFG scale", ylabel="prompt-faithfulness accuracy", title="Accuracy (shapes-test, 3 splits)", ylim=(0, 1.02))
    a2.set(xlabel="CFG scale", ylabel="PSNR vs FP model (dB)", title="Fidelity to the FP model")
    a1.legend(fontsize=7, loc="lower left")
    a1.grid(alpha=0.3)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--recipe", type=Path, help="The 1.99-bit recipe (bf analyze, then bf allocate). Default: WORK/recipe.json")
    p.add_argument("--phase", choices=["train", "eval", "table", "all"], default="all")
    p.add_argument("--steps", type=int, default=800, help="Training steps of every row (Stage I + Stage II).")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=9, help="Processes at once.")
    p.add_argument("--rows", default=None, help="Only these rows (comma-separated keys: lsq2,balance,...); the FP row is always in.")
    p.add_argument("--seeds", type=int, default=2, help="Eval images per prompt.")
    p.add_argument("--limit", type=int, default=None, help="Eval prompts per split (default: all).")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--json", type=Path, default=Path("results/ablation.json"))
    p.add_argument("--plot", type=Path, default=Path("results/ablation.png"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.recipe or args.work / "recipe.json"
    table_rows = rows(recipe, args.steps)
    if args.phase in ("train", "all"):
        train(args, table_rows)
    if args.phase in ("eval", "all"):
        evaluate(args, table_rows)
    if args.phase in ("table", "all"):
        result = table(args, table_rows)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        plot(result, args.plot)
        for row in result["rows"]:
            per = [row["cfg"][str(c)] for c in CFGS]
            accs = " ".join(f"{r['accuracy']:.3f}" for r in per)
            psnr = " ".join("  -  " if r["psnr"] is None else f"{r['psnr']:5.1f}" for r in per)
            print(f"{row['row'][:52]:52s} {row['avg_bits']:6.3f} {row['stored_bytes'] / 1e6:7.2f} MB  acc {accs}  psnr {psnr}")
        print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
