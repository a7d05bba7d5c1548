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
