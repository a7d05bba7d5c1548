"""bf analyze: per-layer records, the model left untouched, resume, and refusal of mismatched resumes."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from bf.errors import BfError  # noqa: E402
from bf.trainer.allocate import allocate  # noqa: E402
from bf.trainer.analyze import AnalyzeConfig, analyze  # noqa: E402

CFG = AnalyzeConfig(limit=1, steps=2, batch_size=8)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from bf.models.pipeline import load_model

    return load_model(tiny_model).pipe


def test_analyze_records_each_width_and_restores_the_model(pipe, tmp_path):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    out = tmp_path / "a.json"
    res = analyze(
        pipe, {"path": "tiny", "hash": "h1"}, AnalyzeConfig(**{**CFG.__dict__, "layers": r"^down_blocks\.0\.resnets\.0\.conv1$"}), out
    )
    assert list(res["layers"]) == ["down_blocks.0.resnets.0.conv1"]
    rec = res["layers"]["down_blocks.0.resnets.0.conv1"]
    assert rec["params"] == 32 * 32 * 9 and set(rec["bits"]) == {"1", "2", "3"}
    mse = [rec["bits"][b]["mse"] for b in ("1", "2", "3")]
    assert mse[0] > mse[2] > 0  # fewer bits, further from the FP images
    assert json.loads(out.read_text()) == res
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res["complete"] is False and len(res["candidates"]) > 100
    with pytest.raises(BfError, match="not analysed"):
        allocate(res, 1.99)


def test_resume_keeps_done_layers_and_refuses_other_settings(pipe, tmp_path):
    out = tmp_path / "a.json"
    first = analyze(
        pipe, {"path": "tiny", "hash": "h1"}, AnalyzeConfig(**{**CFG.__dict__, "layers": r"^conv_in$|mid_block.resnets.0.conv1$"}), out
    )
    with pytest.raises(BfError, match="exists; pass --resume"):
        analyze(pipe, {"path": "tiny", "hash": "h1"}, CFG, out)
    with pytest.raises(BfError, match="another model"):
        analyze(pipe, {"path": "other", "hash": "h2"}, CFG, out, resume=True)
    with pytest.raises(BfError, match=r"different settings \(steps\)"):
        analyze(pipe, {"path": "tiny", "hash": "h1"}, AnalyzeConfig(**{**CFG.__dict__, "steps": 3}), out, resume=True)
    second = analyze(
        pipe, {"path": "tiny", "hash": "h1"}, AnalyzeConfig(**{**CFG.__dict__, "layers": r"mid_block.resnets.0.conv2$"}), out, resume=True
    )
    assert list(second["layers"]) == ["mid_block.resnets.0.conv1", "mid_block.resnets.0.conv2"]  # conv_in is never a candidate
    assert second["layers"]["mid_block.resnets.0.conv1"] == first["layers"]["mid_block.resnets.0.conv1"]
    with pytest.raises(BfError, match="matches no candidate"):
        analyze(pipe, {"path": "tiny", "hash": "h1"}, AnalyzeConfig(**{**CFG.__dict__, "layers": "nothing-here"}), out, resume=True)


def test_shards_partition_the_layers_and_merge_back(pipe, tmp_path):
    from bf.trainer.analyze import merge_analyses, parse_shard

    cfg = AnalyzeConfig(**{**CFG.__dict__, "layers": r"^mid_block\.resnets\.0\.conv[12]$|^mid_block\.resnets\.1\.conv1$"})
    model = {"path": "tiny", "hash": "h1"}
    parts = [analyze(pipe, model, cfg, tmp_path / f"p{k}.json", shard=parse_shard(f"{k}/2")) for k in range(2)]
    assert list(parts[0]["layers"]) == ["mid_block.resnets.0.conv1", "mid_block.resnets.1.conv1"]
    assert list(parts[1]["layers"]) == ["mid_block.resnets.0.conv2"]
    whole = analyze(pipe, model, cfg, tmp_path / "whole.json")
    merged = merge_analyses([("p1", parts[1]), ("p0", parts[0])])
    assert merged["layers"] == whole["layers"]  # same numbers, candidate order
    assert list(merged["layers"]) == list(whole["layers"])
    other = {**parts[1], "settings": {**parts[1]["settings"], "steps": 3}}
    with pytest.raises(BfError, match=r"other settings than p0 \(steps\)"):
        merge_analyses([("p0", parts[0]), ("p1", other)])
    with pytest.raises(BfError, match="another model"):
        merge_analyses([("p0", parts[0]), ("p1", {**parts[1], "model": {"hash": "h2"}})])
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(BfError, match="expected K/N"):
            parse_shard(bad)


def test_workers_cli_merges_parts_and_leaves_none_behind(tiny_model, tmp_path):
    from conftest import run_bf

    out = tmp_path / "a.json"
    common = ["--model", str(tiny_model), "--limit", "1", "--steps", "2", "--batch-size", "8", "--device", "cpu"]
    layers = r"^mid_block\.resnets\.[01]\.conv[12]$"
    r = run_bf("analyze", *common, "--layers", layers, "--workers", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert sorted(res["layers"]) == [f"mid_block.resnets.{i}.conv{j}" for i in (0, 1) for j in (1, 2)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    # a second chunk resumes from the merged file: the done layers are kept, not redone
    r = run_bf("analyze", *common, "--layers", r"^mid_block\.attentions\.0\.proj_in$", "--workers", "2", "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    again = json.loads(out.read_text())
    assert len(again["layers"]) == 5 and all(again["layers"][k] == v for k, v in res["layers"].items())
    r = run_bf("analyze", *common, "--steps", "3", "--workers", "2", "--out", str(out), "--resume")
    assert r.returncode == 1 and "different settings (steps)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_workers_refuse_leftover_parts_without_resume(tmp_path):
    from bf.trainer.analyze_workers import run_workers

    out = tmp_path / "a.json"
    (tmp_path / "a.json.part1of3").write_text("{}")  # an interrupted run with --workers 3
    with pytest.raises(BfError, match=r"a\.json\.part1of3 is left from an interrupted analysis; pass --resume"):
        run_workers(lambda k, n, part, r: ["false"], 2, out, resume=False)
