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
    from bf.models.diffusers_pipeline import load_model

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


@pytest.mark.slow
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
    from bf.trainer.analyze_workers import AnalyzeJob, run_workers

    out = tmp_path / "a.json"
    (tmp_path / "a.json.part1of3").write_text("{}")  # an interrupted run with --workers 3
    with pytest.raises(BfError, match=r"a\.json\.part1of3 is left from an interrupted analysis; pass --resume"):
        run_workers(AnalyzeJob("tiny", {"path": "tiny", "hash": "h1"}, AnalyzeConfig(), "cpu"), 2, out, resume=False)


def test_short_qat_starts_from_ptq_lowers_the_distillation_loss_and_restores_the_model(pipe):
    from bf.format import Grid
    from bf.trainer.ptq import PTQConfig, quantize_weight
    from bf.trainer.qat import LossConfig, stage1_loss
    from bf.trainer.short_qat import ShortQAT, ShortQATConfig

    name, grid = "mid_block.resnets.0.conv1", Grid(1, "balanced")
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    tuner = ShortQAT(pipe, ShortQATConfig(steps=0, images=16, lr=1e-3))
    ptq = quantize_weight(name, before[f"{name}.weight"], grid, PTQConfig(init="alt"))
    zero = tuner.tune(unet, name, grid, "alt")
    assert (zero.codes == ptq.codes).all() and (zero.scale == ptq.scale).all()  # 0 steps: exactly the PTQ layer
    tuner.cfg = ShortQATConfig(steps=60, images=16, lr=1e-4)
    tuned = tuner.tune(unet, name, grid, "alt")
    assert not hasattr(unet.get_submodule(name), "parametrizations")
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)

    def loss_with(layer):  # Stage I loss on a fixed batch with the layer's dequantized weight
        g = torch.Generator().manual_seed(5)
        t = torch.randint(0, 1000, (16,), generator=g)
        a = tuner.frozen.alphas_cumprod[t].view(-1, 1, 1, 1)
        z = a.sqrt() * tuner.frozen.data.latents + (1 - a).sqrt() * torch.randn(tuner.frozen.data.latents.shape, generator=g)
        cond = tuner.frozen.encode_text(tuner.frozen.data.captions)
        with torch.no_grad():
            unet.get_submodule(name).weight.copy_(torch.from_numpy(layer.dequantize()))
            loss, _ = stage1_loss(unet, tuner.frozen.teacher, z, t, cond, LossConfig())
            unet.get_submodule(name).weight.copy_(before[f"{name}.weight"])
        return float(loss)

    assert loss_with(tuned) < 0.8 * loss_with(ptq)


@pytest.fixture(scope="module")
def tiny_clip(tiny_model, tmp_path_factory):
    """A random CLIP model directory (tiny, with the tiny model's tokenizer): CLIP scores are computed, not meaningful."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip")
    tok = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text, vision = {"vocab_size": tok.vocab_size, **tower}, {"image_size": 32, "patch_size": 8, **tower}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out, safe_serialization=True)
    CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tok).save_pretrained(out)
    return out


def test_clip_scores_give_the_semantic_drop_of_prompts_that_cannot_be_judged(pipe, tiny_clip, tmp_path):
    from bf.evaluate.clip_score import ClipScorer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\nan oil painting of a harbour\n")
    cfg = AnalyzeConfig(**{**CFG.__dict__, "prompts": str(prompts), "layers": r"^mid_block\.resnets\.0\.conv1$", "clip": str(tiny_clip)})
    res = analyze(pipe, {"path": "tiny", "hash": "h1"}, cfg, tmp_path / "a.json")
    fp = res["fp"]["clip_score"]
    assert res["fp"]["accuracy"] is None and -1 <= fp <= 1
    for rec in res["layers"]["mid_block.resnets.0.conv1"]["bits"].values():
        assert rec["accuracy"] is None and rec["semantic_drop"] == pytest.approx(fp - rec["clip_score"]) and rec["clip_score"] != fp
    images = torch.rand(2, 16, 16, 3).numpy()
    scorer = ClipScorer(tiny_clip)
    assert scorer(images, ["a", "b"]) == pytest.approx(scorer(images[::-1], ["b", "a"]))  # pairs, not positions
    with pytest.raises(BfError, match="not a local CLIP model directory"):
        ClipScorer(tmp_path)


def test_a_worker_ends_its_log_with_one_error_line(tmp_path):
    """The parent quotes a failed worker's last log line: it is the error, not the end of a traceback."""
    import subprocess
    import sys
    from dataclasses import asdict

    request = tmp_path / "a.json.part0of2.request.json"
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(AnalyzeConfig()).items()}
    job = {"model_dir": str(tmp_path / "nosuch"), "model": {"path": "x", "hash": "h"}, "cfg": cfg, "device": "cpu"}
    request.write_text(json.dumps(job | {"shard": [0, 2], "out": str(tmp_path / "a.json.part0of2"), "resume": False}))
    r = subprocess.run([sys.executable, "-m", "bf.trainer.analyze_workers", str(request)], capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: ") and "nosuch" in last, r.stderr
