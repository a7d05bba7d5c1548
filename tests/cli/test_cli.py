"""The CLI end to end, as a user runs it: random-model -> quantize -> inspect."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bf.format import Checkpoint
from bf.models.directory import ModelDir
from tests.conftest import run_bf


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-2bit.bfq"
    r = run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_inspect_json_fields(quantized, tiny_model):
    r = run_bf("inspect", quantized, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    for key in (
        "format_version",
        "layers",
        "quantized_params",
        "avg_bits",
        "stored_bits_per_weight",
        "unet_bytes",
        "fp16_bytes",
        "ratio_vs_fp16",
    ):
        assert key in s
    for layer in s["layers"]:
        assert set(layer) >= {"name", "shape", "params", "bits", "levels", "stored_bytes"}
        assert layer["params"] == int(np.prod(layer["shape"]))
    by_name = {layer["name"]: layer for layer in s["layers"]}
    assert by_name["conv_in"]["bits"] == 8 and by_name["conv_out"]["bits"] == 8
    assert {layer["bits"] for n, layer in by_name.items() if n not in ("conv_in", "conv_out")} == {2}
    assert all(layer["levels"] == 5 for n, layer in by_name.items() if n not in ("conv_in", "conv_out"))
    assert not any("time_emb" in n for n in by_name)
    assert s["quantized_params"] == sum(layer["params"] for layer in s["layers"])
    assert s["ratio_vs_fp16"] == pytest.approx(s["fp16_bytes"] / s["unet_bytes"])
    weights = ModelDir.open(tiny_model).read_weights("unet")
    assert s["unet_params"] == sum(v.size for v in weights.values())
    assert s["fp16_bytes"] == 2 * s["unet_params"]
    assert s["base_model"]["hash"] == ModelDir.open(tiny_model).content_hash()


def test_inspect_human_output(quantized):
    r = run_bf("inspect", quantized, "--layers")
    assert r.returncode == 0
    assert "down_blocks.0.resnets.0.conv1" in r.stdout and "avg bits (paper)" in r.stdout


def test_checkpoint_reproduces_the_unet(quantized, tiny_model):
    """Unquantized tensors are kept (fp16, time layers fp32) and weights are s * level."""
    ckpt = Checkpoint.load(quantized)
    fp = ModelDir.open(tiny_model).read_weights("unet")
    sd = ckpt.unet_state_dict()
    assert set(sd) == set(fp)
    for k, v in ckpt.tensors.items():
        expect = fp[k].astype(np.float32 if ("time_emb" in k or k.startswith("time_embedding")) else np.float16)
        np.testing.assert_array_equal(v, expect)
    w, q, scale = fp["conv_in.weight"], sd["conv_in.weight"], ckpt.layers["conv_in"].scale
    row_err = np.abs(w - q).reshape(len(scale), -1).max(1)
    assert np.all(row_err <= scale / 2 + 1e-7), row_err / scale  # 8-bit: every row within half of its own step
    assert ckpt.recipe["init"] == "alt" and ckpt.provenance["command"].startswith("bf quantize")


def _unet_output_error(tiny_model, ckpt_path):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        sd = {k: torch.from_numpy(v) for k, v in Checkpoint.load(ckpt_path).unet_state_dict().items()}
        unet.load_state_dict(sd)
        out = unet(x, t, ctx).sample
    return float(((out - ref) ** 2).mean() / (ref**2).mean())


def test_more_bits_give_a_closer_unet(tiny_model, quantized, tmp_path):
    errs = {2: _unet_output_error(tiny_model, quantized)}
    for bits in (4, 8):
        out = tmp_path / f"{bits}.bfq"
        assert run_bf("quantize", "--model", tiny_model, "--bits", str(bits), "--out", out).returncode == 0
        errs[bits] = _unet_output_error(tiny_model, out)
    assert errs[8] < 1e-3, errs
    assert errs[8] < errs[4] < errs[2], errs


def test_alternating_init_beats_minmax_on_the_unet(tiny_model, quantized, tmp_path):
    out = tmp_path / "minmax.bfq"
    assert run_bf("quantize", "--model", tiny_model, "--bits", "2", "--init", "minmax", "--out", out).returncode == 0
    assert _unet_output_error(tiny_model, quantized) < _unet_output_error(tiny_model, out)


def test_plain_grid_and_recipe(tiny_model, tmp_path):
    from bf.trainer.recipe import make_recipe

    plain = tmp_path / "plain.bfq"
    assert run_bf("quantize", "--model", tiny_model, "--bits", "2", "--grid", "plain", "--init", "minmax", "--out", plain).returncode == 0
    s = json.loads(run_bf("inspect", plain, "--json").stdout)
    assert {w["grid"] for w in s["by_width"]} == {"plain"}
    assert next(w for w in s["by_width"] if w["bits"] == 2)["code_bits_per_weight"] == pytest.approx(2.0, abs=0.02)

    layers = [layer["name"] for layer in s["layers"] if layer["name"] not in ("conv_in", "conv_out")]
    recipe = make_recipe("balanced", {name: 1 + i % 4 for i, name in enumerate(layers)})
    rpath = tmp_path / "recipe.json"
    rpath.write_text(json.dumps(recipe))
    mixed = tmp_path / "mixed.bfq"
    r = run_bf("quantize", "--model", tiny_model, "--recipe", rpath, "--out", mixed)
    assert r.returncode == 0, r.stderr
    got = {layer["name"]: layer["bits"] for layer in json.loads(run_bf("inspect", mixed, "--json").stdout)["layers"]}
    assert all(got[name] == bits for name, bits in recipe["layers"].items())
    assert got["conv_in"] == 8


def test_bundle_embeds_text_encoder_and_vae(tiny_model, tmp_path):
    out = tmp_path / "b.bfq"
    assert run_bf("quantize", "--model", tiny_model, "--bits", "3", "--bundle", "--out", out).returncode == 0
    ckpt = Checkpoint.load(out)
    te = ModelDir.open(tiny_model).read_weights("text_encoder")
    assert set(ckpt.bundle.tensors["text_encoder"]) == set(te)
    assert all(v.dtype == np.float16 for v in ckpt.bundle.tensors["vae"].values())
    assert {
        "model_index.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "vae/config.json",
    } <= set(ckpt.bundle.files)
    assert ckpt.bundle.files["tokenizer/vocab.json"] == (tiny_model / "tokenizer" / "vocab.json").read_bytes()


# ---- bad input: one line on stderr, exit 1, no traceback, nothing written -------------


def _one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_cli_bad_checkpoints(quantized, tmp_path):
    _one_line_error(run_bf("inspect", tmp_path / "missing.bfq"), "no such file")
    trunc = tmp_path / "trunc.bfq"
    trunc.write_bytes(quantized.read_bytes()[: quantized.stat().st_size // 2])
    _one_line_error(run_bf("inspect", trunc), "trunc.bfq", "truncated or corrupt")
    bad = tmp_path / "bad.bfq"
    raw = bytearray(quantized.read_bytes())
    raw[-10] ^= 0x55
    bad.write_bytes(bytes(raw))
    _one_line_error(run_bf("inspect", bad), "bad.bfq", "checksum mismatch")
    text = tmp_path / "notes.bfq"
    text.write_text("hello")
    _one_line_error(run_bf("inspect", text), "notes.bfq")


def test_inspect_rejects_nonconforming_codes_unless_told_not_to_verify(quantized, tmp_path):
    ckpt = Checkpoint.load(quantized)
    name, layer = next((n, ly) for n, ly in ckpt.layers.items() if ly.grid.bits == 2)
    layer.codes[-1] = 0x01  # the buffer's last padding byte; the checksums are made after this
    bad = tmp_path / "other-writer.bfq"
    ckpt.save(bad)
    end = layer.codes.size - 1
    _one_line_error(run_bf("inspect", bad), "other-writer.bfq", f"layer '{name}' codes: buffer padding byte {end} ", "is 0x01, not 0")
    r = run_bf("inspect", bad, "--no-verify", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quantized_params"] == json.loads(run_bf("inspect", quantized, "--json").stdout)["quantized_params"]


def test_cli_bad_model_and_options(tiny_model, tmp_path):
    out = tmp_path / "x.bfq"
    _one_line_error(run_bf("quantize", "--model", tmp_path / "nope", "--bits", "2", "--out", out), "no such model directory")
    _one_line_error(run_bf("quantize", "--model", tiny_model, "--out", out), "exactly one of --bits")
    rpath = tmp_path / "r.json"
    rpath.write_text('{"format": "bf.recipe", "version": 1, "grid": "balanced", "layers": {"not_a_layer": 2}}')
    bad = run_bf("quantize", "--model", tiny_model, "--recipe", rpath, "--out", out)
    _one_line_error(bad, "not in this UNet", "bf analyze and bf allocate")
    rpath.write_text("{broken")
    _one_line_error(run_bf("quantize", "--model", tiny_model, "--recipe", rpath, "--out", out), "not a readable recipe")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp files left behind
    r = run_bf("quantize", "--model", tiny_model, "--bits", "9", "--out", out)
    assert r.returncode == 2 and "9 is not in the range 1<=x<=8" in r.stderr


def test_binary_recipe_is_a_one_line_error(tmp_path):
    from bf.errors import BfError
    from bf.trainer.recipe import load_recipe

    rpath = tmp_path / "r.json"
    rpath.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(BfError, match="not a readable recipe JSON") as e:
        load_recipe(rpath)
    assert "\n" not in str(e.value)


def test_broken_unet_config_fails_before_quantizing(tiny_model, tmp_path, monkeypatch):
    import shutil

    import bf.trainer.quantize_model as pipeline
    from bf.errors import BfError

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    (d / "unet" / "config.json").write_bytes(b"\xff\xfe not json")

    def too_late(*a, **k):
        raise AssertionError("quantized before reading the UNet config")

    monkeypatch.setattr(pipeline, "quantize_state_dict", too_late)
    with pytest.raises(BfError, match=r"unet/config\.json: unreadable config"):
        pipeline.quantize_model(ModelDir.open(d), pipeline.QuantizeRequest(bits=2))


def test_random_model_refuses_to_overwrite(tiny_model):
    _one_line_error(run_bf("random-model", "--out", tiny_model), "already exists", "--force")


def test_help_explains_every_command():
    r = run_bf("--help")
    for cmd in ("random-model", "quantize", "inspect"):
        assert cmd in r.stdout
    assert "--bundle" in run_bf("quantize", "--help").stdout


def test_cli_unwritable_output_and_damaged_weights(tiny_model, tmp_path):
    (tmp_path / "adir.bfq").mkdir()
    _one_line_error(run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", tmp_path / "adir.bfq"), "adir.bfq")
    import shutil

    from safetensors.numpy import save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    w = ModelDir.open(d).read_weights("unet")
    w["down_blocks.0.resnets.0.conv1.weight"][0, 0, 0, 0] = np.nan
    save_file(w, str(f))
    _one_line_error(
        run_bf("quantize", "--model", d, "--bits", "2", "--out", tmp_path / "x.bfq"), "down_blocks.0.resnets.0.conv1.weight", "NaN"
    )
    assert not (tmp_path / "x.bfq").exists()


def test_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path):
    from bf.errors import BfError
    from bf.evaluate.evaluation import prompt_sets

    f = tmp_path / "prompts.txt"
    f.write_bytes(b"a red circle\n\xff\xfe a blue square\n")
    with pytest.raises(BfError, match=r"prompts.txt: not a UTF-8 text file \(byte 13\); save the prompts as UTF-8"):
        prompt_sets(str(f))
    f.write_text("a red circle\nune étoile bleue\n", encoding="utf-8")
    assert [p for s in prompt_sets(str(f)) for p in s.prompts] == ["a red circle", "une étoile bleue"]


def test_quantize_refuses_to_overwrite_and_checks_out_before_work(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "m.bfq"
    out.write_bytes(b"mine")
    r = run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", out)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {out} already exists; pass --force to replace it"]
    assert out.read_bytes() == b"mine"
    assert run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", out, "--force").returncode == 0
    assert out.read_bytes()[:8] != b"mine"
    _one_line_error(run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", tmp_path), "is a directory; give a file name")
    # an unwritable directory (as root every directory is writable, so os.access is made to say no)
    from bf.cli.checks import check_writable_file
    from bf.errors import BfError

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "sub" else real_access(p, mode))
    (tmp_path / "sub").mkdir()
    with pytest.raises(BfError, match=r"sub is not a writable directory; choose another --out"):
        check_writable_file(tmp_path / "sub" / "deeper" / "m.bfq")
    check_writable_file(tmp_path / "new" / "m.bfq")  # a directory to be made under a writable one is fine
