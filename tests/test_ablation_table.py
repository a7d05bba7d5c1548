"""tools/ablation.py's table: intervals, paired differences against the previous row, the FP model and the FP
control, from bf eval's per-image verdicts; the plot is drawn."""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _eval_results(rng, p_success: float, prompts: int = 12, seeds: int = 2) -> list[dict]:
    out = []
    for cfg in (3.5, 5.5, 7.5, 9.5):
        for split in ("single", "two", "heldout", "heldout-two"):
            v = (rng.random(prompts * seeds) < p_success).astype(float)
            out.append({"model": "m", "cfg": cfg, "split": split, "images": v.size, "seeds": seeds,
                        "accuracy": {"overall": float(v.mean())},
                        "accuracy_ci95": [0.0, 1.0], "overall_per_image": v.tolist(), "mse": 0.01, "psnr": 20.0,
                        "mse_per_image": (0.01 * (1 + 0.2 * rng.standard_normal(v.size))).tolist()})  # fmt: skip
    return out


def test_the_table_pairs_rows_on_the_same_images(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(REPO / "tools"))
    import ablation

    rng = np.random.default_rng(0)
    evals = {"fp": _eval_results(rng, 0.5), "lsq2": _eval_results(rng, 0.8), "fpctl": _eval_results(rng, 0.6)}
    for key, results in evals.items():
        (tmp_path / f"{key}.eval.json").write_text(json.dumps({"results": results}))
        if key != "fp":
            out = ablation.output(tmp_path, key)
            work = out.with_name(out.name + ".work")
            work.mkdir()
            (work / "log.csv").write_text("stage,step,loss,noise,feature,lr,seconds\n2,5,0.1,0.1,0,0.0001,3.0\n")
    monkeypatch.setattr(ablation, "_inspect", lambda p: {"avg_bits": 2.0, "unet_bytes": 1000, "stored_bits_per_weight": 2.1,
                                                         "fp16_bytes": 8000})  # fmt: skip
    args = argparse.Namespace(work=tmp_path, rows="lsq2,fpctl", steps=10, batch_size=4, lr=1e-4, images=8, seed=0, seeds=2,
                              limit=None, prompts="shapes-test", cfgs=(3.5, 5.5, 7.5, 9.5), images_per_split=0)  # fmt: skip
    result = ablation.table(args, ablation.rows(tmp_path / "r.json", 10))
    by_key = {r["key"]: r for r in result["rows"]}
    assert list(by_key) == ["fp", "lsq2", "fpctl"]
    assert by_key["fp"]["stored_bytes"] == by_key["fpctl"]["stored_bytes"] == 8000 and by_key["fpctl"]["avg_bits"] == 16.0
    for key, other, name in (("lsq2", "fp", "previous"), ("lsq2", "fp", "fp_control"), ("fpctl", "fp", "previous")):
        d = by_key[key]["differences"][name]
        assert d["row"] == other
        for cfg in ("3.5", "7.5"):
            a = np.concatenate([v for v, _ in ablation.per_image(evals[other], float(cfg))])
            b = np.concatenate([v for v, _ in ablation.per_image(evals[key], float(cfg))])
            assert d[cfg]["difference"] == pytest.approx(b.mean() - a.mean())
            assert d[cfg]["ci95"][0] <= d[cfg]["difference"] <= d[cfg]["ci95"][1]
    assert "fp_control" not in by_key["fpctl"]["differences"] and by_key["fp"]["differences"] == {}
    # a row without Stage II is compared with the FP model itself as its same-budget control
    assert by_key["lsq2"]["differences"]["fp_control"]["row"] == "fp"
    acc = by_key["lsq2"]["cfg"]["7.5"]
    assert acc["accuracy_ci95"][0] < acc["accuracy"] < acc["accuracy_ci95"][1]
    assert acc["accuracy"] == pytest.approx(np.mean([v for v, _ in ablation.per_image(evals["lsq2"], 7.5)]))
    assert by_key["lsq2"]["training"]["final"]["2"]["step"] == 5
    # PSNR of the mean MSE (0.01 on every split: 20 dB) with an interval from the per-image MSEs around it
    lo, hi = acc["psnr_ci95"]
    assert lo < 20.0 < hi and hi - lo < 0.5
    ablation.plot(result, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000
    # one CFG scale: rows down the side, each split's accuracy beside the overall one
    one = {**result, "settings": {**result["settings"], "eval": {**result["settings"]["eval"], "cfgs": [7.5]}}}
    ablation.plot(one, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 10_000
    evals["fp"][0].pop("overall_per_image")
    (tmp_path / "fp.eval.json").write_text(json.dumps({"results": evals["fp"]}))
    with pytest.raises(ablation.BfError, match="without per-image verdicts"):
        ablation.table(args, ablation.rows(tmp_path / "r.json", 10))


def _table(differences: dict[str, tuple[str, float, float]]) -> dict:
    """A tools/ablation.py table at CFG 7.5 whose rows have these (other row, difference, interval half-width)."""
    rows = [{"row": "FP model", "key": "fp", "cfg": {"7.5": {}}, "differences": {}}]
    for key, (other, d, half) in differences.items():
        rows.append({"row": f"+ {key}", "key": key, "cfg": {"7.5": {}},
                     "differences": {"previous": {"row": other, "7.5": {"difference": d, "ci95": [d - half, d + half]}}}})  # fmt: skip
    return {"rows": rows, "settings": {"steps": 150}}


def test_effects_over_training_runs_get_a_t_interval_and_a_verdict(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import ablation_replicates as rep

    runs = [
        _table({"up": ("fp", 0.08, 0.01), "flip": ("up", 0.03, 0.01), "down": ("flip", -0.05, 0.01)}),
        _table({"up": ("fp", 0.09, 0.01), "flip": ("up", -0.03, 0.01), "down": ("flip", -0.07, 0.01)}),
        _table({"up": ("fp", 0.10, 0.01), "flip": ("up", 0.00, 0.01), "down": ("flip", -0.06, 0.01)}),
    ]
    found = {e["row"]: e for e in rep.effects(runs, "7.5")}
    up = found["up"]
    assert up["mean"] == pytest.approx(0.09) and up["sd_over_runs"] == pytest.approx(0.01)
    assert up["ci95_over_runs"] == pytest.approx([0.09 - 4.303 * 0.01 / 3**0.5, 0.09 + 4.303 * 0.01 / 3**0.5])
    assert up["verdict"] == "holds" and found["down"]["verdict"] == "reversed"
    assert found["flip"]["verdict"] == "not shown"  # two runs' intervals exclude 0, on different sides
    assert rep.t975(2) == 4.303 and rep.t975(40) == 2.042 and rep.t975(11) == 2.228

    for i, run in enumerate(runs):
        (tmp_path / f"r{i}.json").write_text(json.dumps(run))
    monkeypatch.setattr(sys, "argv", ["ablation_replicates.py", str(tmp_path / "r0.json")])
    with pytest.raises(SystemExit):
        rep.main()
    assert rep.load_run(tmp_path / "r0.json", "7.5")["settings"]["steps"] == 150
    with pytest.raises(rep.BfError, match=r"no evaluation at CFG 3.5 \(it has 7.5\)"):
        rep.load_run(tmp_path / "r0.json", "3.5")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(rep.BfError, match="is not JSON"):
        rep.load_run(tmp_path / "bad.json", "7.5")
    with pytest.raises(rep.BfError, match="cannot be read"):
        rep.load_run(tmp_path, "7.5")
    for given, message in (([tmp_path / "r0.json", tmp_path / "r0.json"], "is given twice"),
                           ([tmp_path / "r0.json", tmp_path / "r1.json", tmp_path / "bad.json"], "is not JSON")):  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["ablation_replicates.py", *map(str, given)])
        with pytest.raises(SystemExit):
            rep.main()
        assert message in capsys.readouterr().err
    (tmp_path / "copy.json").write_text((tmp_path / "r0.json").read_text())
    monkeypatch.setattr(sys, "argv", ["ablation_replicates.py", str(tmp_path / "r0.json"), str(tmp_path / "copy.json")])
    with pytest.raises(SystemExit):
        rep.main()
    assert "hold the same rows" in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(rep.BfError, match=r"is not a tools/ablation\.py table"):
        rep.load_run(tmp_path / "list.json", "7.5")
