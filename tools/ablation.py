"""The ablation table (the paper's Table 4, on the shipped model).

Every row is one ``bf train`` command with the same number of training steps; each
adds one technique to the row above. Beside them, the FP control: the FP model trained
with the same data, batch, learning rate, steps and losses (``bf train --fp-control``), so
that a row above the FP model can be told apart from what training alone does. All rows
are evaluated with ``bf eval`` against the FP model at CFG 3.5/5.5/7.5/9.5 (or --cfg) on the same
prompts and seeds, and the table is written as JSON and a plot: overall accuracy with its
95% interval (bf.evaluate.intervals: prompts resampled, or seeds alone where the prompts
are all of a split's scenes), and each row's paired difference against the row it adds a technique to, against the FP model and against the
control, each with its interval.

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

import numpy as np

from bf.errors import BfError
from bf.evaluate.intervals import combined_ci, combined_difference
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
        # Stage I of an FP student distils it from itself (the identity): this one control serves every row
        ("fpctl", "FP control: the FP model trained like the full recipe", ["--fp-control", "--stage2-steps", str(steps // 2)]),
    ]


# The row each row adds its technique to (the FP control is compared with the FP model it starts from).
PREVIOUS = {"lsq2": "fp", "balance": "lsq2", "altinit": "balance", "mixed": "altinit", "feature": "mixed", "beta": "feature",
            "stage2": "beta", "stage2x": "stage2", "fpctl": "fp"}  # fmt: skip


def output(work: Path, key: str) -> Path:
    """Where ``bf train`` writes a row: a .bfq, or the FP control's model directory."""
    return work / (key if key == "fpctl" else f"{key}.bfq")


def stage1_steps(key: str, steps: int) -> int:
    return steps - steps // 2 if key in ("stage2", "fpctl") else steps


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
        out = output(args.work, key)
        if extra is None or out.exists() or (args.rows and key not in args.rows.split(",")):
            continue
        jobs[key] = bf(
            "train", *extra, "--stage1-steps", str(stage1_steps(key, args.steps)), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--images", str(args.images), "--seed", str(args.seed), "--checkpoint-every", str(max(1, args.steps)),
            "--out", str(out), *(["--resume"] if (out.with_name(out.name + ".work") / "state.safetensors").exists() else []),
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
        model = "shipped" if extra is None else str(output(args.work, key))
        jobs[key] = bf(
            "eval", "--model", model, "--reference", "shipped", "--cfg", ",".join(map(str, args.cfgs)), "--seeds", str(args.seeds),
            "--images-per-split", str(args.images_per_split),
            "--prompts", args.prompts, "--batch-size", str(args.eval_batch), "--json", str(out),
            *(["--limit", str(args.limit)] if args.limit else []),
        )  # fmt: skip
    run_parallel(jobs, args.work, args.parallel, "eval")


def per_image(results: list[dict], cfg: float) -> list[tuple[np.ndarray, bool]]:
    """Every image's overall verdict at one CFG scale, by split (in name order): (prompts x seeds, whether the
    prompts are all the split's scenes)."""
    rs = sorted((r for r in results if r["cfg"] == cfg), key=lambda r: r["split"])
    if any("overall_per_image" not in r for r in rs):
        raise BfError("an evaluation without per-image verdicts (made by an older bf eval); run the eval phase again")
    return [(np.array(r["overall_per_image"], dtype=np.float64).reshape(-1, r["seeds"]), r.get("whole_split", False)) for r in rs]


def paired(a: list[tuple[np.ndarray, bool]], b: list[tuple[np.ndarray, bool]]) -> dict:
    """``b`` minus ``a`` over every image of the splits, paired image by image, with its interval (combined_ci)."""
    if [v.shape for v, _ in a] != [v.shape for v, _ in b]:
        raise BfError("two rows evaluated on different prompts or seeds cannot be paired; evaluate them with the same settings")
    return combined_difference([(va, vb, whole) for (va, whole), (vb, _) in zip(a, b, strict=True)])


def per_cfg(results: list[dict], cfgs: tuple[float, ...]) -> dict[str, dict]:
    """Accuracy over all images of a CFG scale (the splits weighted by images) with its 95% interval (combined_ci:
    each split varies by its own rule), PSNR of their mean MSE, and each split's figures."""
    out = {}
    for cfg in cfgs:
        rs = [r for r in results if r["cfg"] == cfg]
        n = sum(r["images"] for r in rs)
        mse = sum(r["mse"] * r["images"] for r in rs) / n
        splits = {r["split"]: {"accuracy": r["accuracy"]["overall"], **{k: r.get(k) for k in ("accuracy_ci95", "psnr", "images")}}
                  for r in rs}  # fmt: skip
        out[str(cfg)] = {
            "accuracy": sum(r["accuracy"]["overall"] * r["images"] for r in rs) / n,
            "accuracy_ci95": combined_ci(per_image(results, cfg)),
            "psnr": None if mse == 0 else 10 * math.log10(1 / mse),
            "psnr_ci95": psnr_interval(rs),
            "splits": splits,
        }
    return out


def psnr_interval(rs: list[dict]) -> list[float] | None:
    """95% interval of the PSNR of the mean MSE over several splits' images (each split varying by its own rule, as
    combined_ci), the MSE interval's ends swapped through PSNR = 10 log10(1 / MSE); None without per-image MSEs (an
    older bf eval, or the reference itself)."""
    if not rs or any("mse_per_image" not in r for r in rs) or not any(any(r["mse_per_image"]) for r in rs):
        return None  # (all zero: the reference itself)
    lo, hi = combined_ci([(np.array(r["mse_per_image"], dtype=np.float64).reshape(-1, r["seeds"]), r.get("whole_split", False))
                          for r in rs])  # fmt: skip
    return [math.inf if hi <= 0 else 10 * math.log10(1 / hi), math.inf if lo <= 0 else 10 * math.log10(1 / lo)]


def control_of(args: list[str] | None) -> str:
    """A row's same-budget FP control: the FP control row, or for a row without Stage II the FP model itself (an FP
    student's Stage I, a distillation from itself, leaves it as it is)."""
    return "fp" if args and "--no-stage2" in args else "fpctl"


def differences(evals: dict[str, list[dict]], cfgs: tuple[float, ...], args: dict[str, list[str] | None]) -> dict[str, dict]:
    """Each row's paired difference of overall accuracy (this row minus the other, same prompts and seeds) against the
    row it adds a technique to, the FP model and its same-budget FP control (control_of), at every CFG scale, with
    95% intervals."""
    out: dict[str, dict] = {}
    for key in evals:
        others = {"previous": PREVIOUS.get(key), "fp": "fp", "fp_control": control_of(args.get(key))}
        for name, other in others.items():
            if key == "fp" or other in (None, key) or other not in evals or (name == "fp" and PREVIOUS.get(key) == "fp"):
                continue
            out.setdefault(key, {})[name] = {
                "row": other,
                **{str(c): paired(per_image(evals[other], c), per_image(evals[key], c)) for c in cfgs},
            }
    return out


def _final_losses(log_csv: Path) -> dict:
    last = {}
    with open(log_csv) as f:
        for row in csv.DictReader(f):
            last[row["stage"]] = {"step": int(row["step"]), "loss": float(row["loss"]), "seconds": float(row["seconds"])}
    return last


def _inspect(bfq: Path | str) -> dict:
    return json.loads(subprocess.run(bf("inspect", "--json", str(bfq)), capture_output=True, text=True, check=True).stdout)


def table(args, table_rows) -> dict:
    times = json.loads((args.work / "train_seconds.json").read_text()) if (args.work / "train_seconds.json").exists() else {}
    out_rows, evals = [], {}
    fp16_bytes = None
    for key, label, extra in table_rows:
        if args.rows and extra is not None and key not in args.rows.split(","):
            continue
        evals[key] = json.loads((args.work / f"{key}.eval.json").read_text())["results"]
        row = {"row": label, "key": key, "command_args": extra}
        if key in ("fp", "fpctl"):
            row.update(avg_bits=16.0)
        else:
            info = _inspect(output(args.work, key))
            fp16_bytes = info["fp16_bytes"]
            row.update(avg_bits=info["avg_bits"], stored_bytes=info["unet_bytes"], stored_bits_per_weight=info["stored_bits_per_weight"])
        if extra is not None:
            out = output(args.work, key)
            row["training"] = {"seconds": times.get(key), "final": _final_losses(out.with_name(out.name + ".work") / "log.csv")}
        row["cfg"] = per_cfg(evals[key], args.cfgs)
        out_rows.append(row)
    if fp16_bytes is None:  # no quantized row in this table: the FP16 size of the same UNet, from the shipped model
        fp16_bytes = _inspect("shipped-1.99bit")["fp16_bytes"]
    for row in out_rows:
        if row["avg_bits"] == 16.0:
            row["stored_bytes"] = fp16_bytes
    diffs = differences(evals, args.cfgs, {key: extra for key, _, extra in table_rows})
    fp = {c: out_rows[0]["cfg"][str(c)]["accuracy"] for c in args.cfgs}
    for row in out_rows:
        row["differences"] = diffs.get(row["key"], {})
        for c in args.cfgs:
            row["cfg"][str(c)]["accuracy_vs_fp"] = row["cfg"][str(c)]["accuracy"] / fp[c] if fp[c] else None
    result = {
        "rows": out_rows,
        "settings": {
            "steps": args.steps, "rows": args.rows, "batch_size": args.batch_size, "lr": args.lr, "images": args.images, "seed": args.seed,
            "eval": {"cfgs": args.cfgs, "seeds": args.seeds, "images_per_split": args.images_per_split, "limit": args.limit,
                     "prompts": args.prompts, "sampler": "PNDM, 50 steps",
                     "reference": "FP model", "intervals": "95%, normal, from each split's variance: bootstrap over prompts (a "
                     "prompt's seeds together), or over seeds where the prompts are all of the split's scenes; paired for differences"},
        },
        "command": " ".join(["python", "tools/ablation.py", *sys.argv[1:]]),
    }  # fmt: skip
    return result


def plot(result: dict, out: Path) -> None:
    """Accuracy against CFG with 95% bands; each row's paired difference against the row it builds on, with its
    interval, at every CFG scale; PSNR against the FP model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cfgs = tuple(result["settings"]["eval"]["cfgs"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(19, 5.2), gridspec_kw={"width_ratios": [1.1, 1.2, 1]})
    if len(cfgs) == 1:  # one scale: no curves to draw, so rows down the side, every split beside the overall figure
        _rows_at_one_scale(rows, str(cfgs[0]), a1, a3)
    for row in rows if len(cfgs) > 1 else ():
        per = [row["cfg"][str(c)] for c in cfgs]
        style = "k--" if row["key"] == "fp" else ("k:" if row["key"] == "fpctl" else "-o")
        (line,) = a1.plot(cfgs, [r["accuracy"] for r in per], style, label=f"{row['row']} ({row['avg_bits']:.2f} bits)")
        if all(r.get("accuracy_ci95") for r in per):
            a1.fill_between(cfgs, [r["accuracy_ci95"][0] for r in per], [r["accuracy_ci95"][1] for r in per], color=line.get_color(),
                            alpha=0.1)  # fmt: skip
        if row["key"] != "fp":
            (line,) = a3.plot(cfgs, [r["psnr"] for r in per], style, label=row["row"])
            if all(r.get("psnr_ci95") for r in per):
                a3.fill_between(cfgs, [r["psnr_ci95"][0] for r in per], [r["psnr_ci95"][1] for r in per], color=line.get_color(), alpha=0.1)
    compared = [row for row in rows if "previous" in row.get("differences", {})]
    for j, c in enumerate(cfgs):
        ys = [i + (j - (len(cfgs) - 1) / 2) * 0.18 for i in range(len(compared))]
        d = [row["differences"]["previous"][str(c)] for row in compared]
        xs = [x["difference"] for x in d]
        err = [[x["difference"] - x["ci95"][0] for x in d], [x["ci95"][1] - x["difference"] for x in d]]
        a2.errorbar(xs, ys, xerr=err, fmt="o", ms=4, capsize=2, label=f"CFG {c}")
    a2.axvline(0, color="k", lw=0.8)
    a2.set_yticks(range(len(compared)), [f"{row['row'][:44]}\nvs {row['differences']['previous']['row']}" for row in compared], fontsize=7)
    a2.invert_yaxis()
    a2.set(xlabel="paired difference of overall accuracy (95% interval)", title="What each row adds")
    a2.legend(fontsize=7)
    splits = ", ".join(sorted(rows[0]["cfg"][str(cfgs[0])]["splits"]))
    if len(cfgs) > 1:
        a1.set(xlabel="CFG scale", ylabel="prompt-faithfulness accuracy", title=f"Accuracy ({splits}), 95% bands", ylim=(0, 1.02))
        bands = any(r["cfg"][str(c)].get("psnr_ci95") for r in rows for c in cfgs)
        a3.set(xlabel="CFG scale", ylabel="PSNR vs FP model (dB)", title="Fidelity to the FP model" + (", 95% bands" if bands else ""))
    a1.legend(fontsize=6, loc="lower left")
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _rows_at_one_scale(rows: list[dict], cfg: str, acc, fid) -> None:
    """Accuracy of each row (overall, and each split's, with 95% intervals) and its PSNR, rows down the side."""
    ys = range(len(rows))
    overall = [row["cfg"][cfg] for row in rows]
    splits = sorted(overall[0]["splits"])
    for k, split in enumerate(splits):
        per = [r["splits"][split] for r in overall]
        off = (k - (len(splits) - 1) / 2) * 0.12
        err = [[p["accuracy"] - p["accuracy_ci95"][0] for p in per], [p["accuracy_ci95"][1] - p["accuracy"] for p in per]]
        acc.errorbar([p["accuracy"] for p in per], [y + off for y in ys], xerr=err, fmt="o", ms=3, capsize=1.5, alpha=0.7, label=split)
    err = [[r["accuracy"] - r["accuracy_ci95"][0] for r in overall], [r["accuracy_ci95"][1] - r["accuracy"] for r in overall]]
    acc.errorbar([r["accuracy"] for r in overall], list(ys), xerr=err, fmt="D", color="k", ms=5, capsize=3, label="all splits")
    acc.axvline(overall[0]["accuracy"], color="k", ls="--", lw=0.8)
    names = [f"{row['row'][:40]} ({row['avg_bits']:.2f} bits)" for row in rows]
    acc.set_yticks(list(ys), names, fontsize=7)
    acc.invert_yaxis()
    acc.set(xlabel=f"prompt-faithfulness accuracy at CFG {cfg} (95% intervals; dashed: the FP model)", xlim=(0, 1.02),
            title="Accuracy by split")  # fmt: skip
    psnr = [(i, r["psnr"]) for i, r in enumerate(overall) if r.get("psnr") is not None]
    fid.barh([i for i, _ in psnr], [v for _, v in psnr], color="tab:gray")
    fid.set_yticks(list(ys), names, fontsize=7)
    fid.set_ylim(len(rows) - 0.5, -0.5)
    lo = min((v for _, v in psnr), default=0)
    fid.set(xlabel="PSNR vs the FP model's image, same prompt and seed (dB)", title="Fidelity to the FP model", xlim=(lo - 3, None))


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
    p.add_argument("--images-per-split", type=int, default=0, help="bf eval --images-per-split: more seeds for a split of few prompts.")
    p.add_argument("--cfg", default=",".join(map(str, CFGS)), help="Guidance scales of the eval (comma-separated).")
    p.add_argument("--limit", type=int, default=None, help="Eval prompts per split (default: all).")
    p.add_argument("--prompts", default="shapes-test", help="bf eval --prompts (default: shapes-test, its four splits).")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--json", type=Path, default=Path("results/ablation.json"))
    p.add_argument("--plot", type=Path, default=Path("results/ablation.png"))
    args = p.parse_args()
    args.cfgs = tuple(float(c) for c in args.cfg.split(","))
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
        shown = "7.5" if 7.5 in args.cfgs else str(args.cfgs[-1])
        print(f"{'row':52s} {'bits':>6s} {'size':>10s}  accuracy [95%] at CFG {shown}   vs previous row [95%]       psnr at {args.cfgs}")
        for row in result["rows"]:
            per = [row["cfg"][str(c)] for c in args.cfgs]
            at = row["cfg"][shown]
            lo, hi = at["accuracy_ci95"]
            prev = row["differences"].get("previous", {}).get(shown)
            delta = f"{prev['difference']:+.3f} [{prev['ci95'][0]:+.3f}, {prev['ci95'][1]:+.3f}]" if prev else " " * 24
            psnr = " ".join("  -  " if r["psnr"] is None else f"{r['psnr']:5.1f}" for r in per)
            size = f"{row['stored_bytes'] / 1e6:7.2f} MB"
            print(f"{row['row'][:52]:52s} {row['avg_bits']:6.3f} {size}  {at['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]   {delta}   {psnr}")
        print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
