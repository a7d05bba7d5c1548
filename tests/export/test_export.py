"""bf export: the dequant op's lowering is exact, the graphs match PyTorch, the custom-op graph runs, bad input is refused."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bf.errors import BfError  # noqa: E402
from bf.format import Checkpoint, Grid, QuantizedLayer  # noqa: E402
from bf.format.dequant_op import ATTRIBUTES, DOMAIN, OP_TYPE, DequantSpec, reference_dequant  # noqa: E402


def one_op_model(layer: QuantizedLayer) -> onnx.ModelProto:
    spec = DequantSpec(layer.shape, layer.grid)
    node = helper.make_node(OP_TYPE, ["codes", "scale"], ["w"], domain=DOMAIN, name="dq", **spec.attributes())
    graph = helper.make_graph(
        [node],
        "one",
        [],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, list(layer.shape))],
        initializer=[numpy_helper.from_array(layer.codes, "codes"), numpy_helper.from_array(layer.scale, "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)], ir_version=8)


@pytest.mark.parametrize("kind", ["balanced", "plain"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_lowered_op_decodes_every_width_bit_for_bit(kind, bits):
    from bf.export.lowering import count_dequant_nodes, lower_graph

    rng = np.random.default_rng(bits)
    grid = Grid(bits, kind)
    for shape in [(3, 7), (5, 3, 3, 3), (1, 1), (17, 33), (2, 1000)]:  # rows that do not fill a field, one value, long rows
        levels = rng.integers(grid.qmin, grid.qmax + 1, size=shape)
        levels.flat[0], levels.flat[-1] = grid.qmin, grid.qmax
        layer = QuantizedLayer.from_levels("x", levels, (rng.random(shape[0]) + 0.1).astype(np.float32), grid)
        low = lower_graph(one_op_model(layer))
        onnx.checker.check_model(low)
        assert count_dequant_nodes(low) == 0 and all(o.domain != DOMAIN for o in low.opset_import)
        out = ort.InferenceSession(low.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        ref = reference_dequant(layer.codes, layer.scale, DequantSpec(shape, grid))
        assert out.dtype == np.float32 and np.array_equal(out, ref), (kind, bits, shape)
        assert np.array_equal(ref, layer.dequantize())


def test_op_attributes_are_validated():
    spec = DequantSpec((4, 3), Grid(2, "balanced"))
    attrs = spec.attributes()
    assert DequantSpec.from_attributes(attrs) == spec
    assert DequantSpec.from_attributes({**attrs, "grid": b"balanced"}) == spec  # as onnx returns strings
    with pytest.raises(ValueError, match="missing attribute"):
        DequantSpec.from_attributes({k: v for k, v in attrs.items() if k != "field_bits"})
    with pytest.raises(ValueError, match="does not match a 2-bit balanced grid"):
        DequantSpec.from_attributes({**attrs, "per_field": 5})
    with pytest.raises(ValueError, match="dtype 3 is not one of"):
        DequantSpec.from_attributes({**attrs, "dtype": 3})
    with pytest.raises(ValueError, match="bits must be"):
        DequantSpec.from_attributes({**attrs, "bits": 9})


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The tiny model quantized to 2 bits, exported as a user would (with --check)."""
    from conftest import run_bf

    tmp = tmp_path_factory.mktemp("export")
    r = run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", tmp / "m.bfq")
    assert r.returncode == 0, r.stderr
    r = run_bf("export", tmp / "m.bfq", "--out", tmp / "onnx", "--steps", "20", "--json")
    assert r.returncode == 0, r.stderr
    return tmp, json.loads(r.stdout), r.stderr


def test_export_writes_packed_graphs_that_match_pytorch(exported):
    tmp, manifest, log = exported
    ckpt = Checkpoint.load(tmp / "m.bfq")
    out = tmp / "onnx"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "scheduler",
        "text_encoder.onnx",
        "tokenizer",
        "unet.onnx",
        "vae_decoder.onnx",
    ]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["op"] == {"domain": "bitsfusion", "op_type": "LowBitDequant", "version": 1}
    assert manifest["scheduler"]["steps"] == 20 and len(manifest["scheduler"]["timesteps"]) == 21  # PNDM repeats one
    assert [c["graph"] for c in manifest["check"]] == ["text_encoder", "unet", "vae_decoder"]
    assert all(c["ok"] and float(c["psnr_db"]) >= 40 for c in manifest["check"])
    assert "unet.onnx: packed codes" in log
    unet = onnx.load(out / "unet.onnx")
    assert [i.name for i in unet.graph.input] == ["sample", "step", "encoder_hidden_states"]
    nodes = [n for n in unet.graph.node if n.domain == DOMAIN]
    assert len(nodes) == len(ckpt.layers) == manifest["graphs"]["unet"]["dequant_ops"]
    # the graph stores the .bfq's packed bytes themselves, and never the time-embedding MLP
    inits = {i.name: i for i in unet.graph.initializer}
    stored = sorted(numpy_helper.to_array(inits[n.input[0]]).tobytes() for n in nodes)
    assert stored == sorted(layer.codes.tobytes() for layer in ckpt.layers.values())
    assert not any("time_embedding" in name for name in inits)
    br = manifest["graphs"]["unet"]["size_breakdown"]
    assert br["packed_codes"] == sum(layer.codes.nbytes for layer in ckpt.layers.values())
    assert br["total"] == (out / "unet.onnx").stat().st_size
    from bf.export.lowering import lower_graph
    from bf.export.sizes import unet_breakdown

    std = unet_breakdown(lower_graph(unet), br["total"])  # the same bytes once lowered (onnx-std)
    assert (std["packed_codes"], std["scales"], std["time_table"]) == (br["packed_codes"], br["scales"], br["time_table"])


def test_unet_graph_by_step_index_equals_the_diffusers_unet_at_that_timestep(exported):
    from bf.export.check import psnr_db
    from bf.export.lowering import lower_graph
    from bf.models.diffusers_pipeline import load_model

    tmp, manifest, _ = exported
    unet = load_model(tmp / "m.bfq").pipe.unet
    sess = ort.InferenceSession(lower_graph(onnx.load(tmp / "onnx" / "unet.onnx")).SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    c, size = unet.config.in_channels, unet.config.sample_size
    sample = rng.standard_normal((2, c, size, size)).astype(np.float32)
    cond = rng.standard_normal((2, 77, unet.config.cross_attention_dim)).astype(np.float32)
    for k in (0, 7, 20):
        t = manifest["scheduler"]["timesteps"][k]
        out = sess.run(None, {"sample": sample, "step": np.array([k]), "encoder_hidden_states": cond})[0]
        with torch.no_grad():
            ref = unet(torch.from_numpy(sample), t, torch.from_numpy(cond)).sample.numpy()
        assert psnr_db(out, ref) > 60, k


def unet_feeds(rng, batch: int, step: int) -> dict[str, np.ndarray]:
    """Random inputs of the tiny model's unet.onnx (8x8 latents, 32-wide text features)."""
    return {
        "sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
        "step": np.array([step]),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32),
    }


def test_custom_op_graph_runs_with_a_reference_op(exported):
    """The custom-op graph itself (not its lowering), through ONNX's reference runtime with the op registered."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from bf.export.lowering import lower_graph

    class LowBitDequant(OpRun):
        op_domain = DOMAIN

        def _run(self, codes, scale, **attrs):
            spec = DequantSpec.from_attributes({k: getattr(self, k) for k in ATTRIBUTES})
            return (reference_dequant(codes, scale, spec),)

    tmp, _, _ = exported
    graph = onnx.load(tmp / "onnx" / "unet.onnx")
    feeds = unet_feeds(np.random.default_rng(1), batch=1, step=3)
    got = ReferenceEvaluator(graph, new_ops=[LowBitDequant]).run(None, feeds)[0]
    want = ort.InferenceSession(lower_graph(graph).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_custom_op_graph_runs_in_onnxruntime_with_the_op_library(exported, ort_op_library):
    """unet.onnx as exported (custom ops over the packed codes) in ONNX Runtime, with plugins_trt's op registered."""
    from bf.export.check import psnr_db
    from bf.export.lowering import lower_graph

    tmp, _, _ = exported
    graph = onnx.load(tmp / "onnx" / "unet.onnx")
    feeds = unet_feeds(np.random.default_rng(2), batch=2, step=7)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(ort_op_library))
    got = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = ort.InferenceSession(lower_graph(graph).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    # Same decoded weights; only the order of ORT's float sums may differ (constant weights are prepacked).
    assert psnr_db(got, want) > 100


def test_a_failed_check_leaves_nothing_behind(exported, monkeypatch):
    from bf.export import check
    from bf.export.exporter import ExportRequest, export_model

    tmp, _, _ = exported
    monkeypatch.setitem(check.PSNR_FLOOR_DB, "float32", 1000.0)
    with pytest.raises(BfError, match=r"export check failed: ONNX Runtime differs from PyTorch: text_encoder .* dB short"):
        export_model(tmp / "m.bfq", tmp / "again", ExportRequest(steps=2))
    assert not (tmp / "again").exists() and not list(tmp.glob(".again.*"))


def test_bad_input_gets_one_line(exported, tmp_path):
    from conftest import run_bf

    tmp, _, _ = exported
    cases = [
        (["export", tmp / "m.bfq", "--out", tmp / "onnx"], "exists and is not empty"),
        (["export", tmp / "m.bfq", "--out", tmp_path / "x", "--height", "100"], "must be multiples of 64 (nearest: 128)"),
        (
            ["export", tmp / "m.bfq", "--out", tmp_path / "x", "--height", "72"],
            "so image sizes must be multiples of 64 (nearest: 64)",
        ),
        (["export", tmp / "m.bfq", "--out", tmp_path / "x", "--fp16"], "--fp16 applies to TensorRT engines only"),
        (["export", tmp_path / "nope.bfq", "--out", tmp_path / "x"], "nope.bfq"),
        (["export", tmp / "m.bfq", "--out", tmp_path / "x", "--base-model", tmp_path / "gone"], "gone"),
    ]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        cases.append(
            (["export", tmp / "m.bfq", "--out", tmp_path / "x", "--target", "trt", "--no-check"], "needs TensorRT's Python package")
        )
    for args, message in cases:
        r = run_bf(*args)
        lines = r.stderr.strip().splitlines()  # progress lines may precede the one error line
        assert r.returncode == 1 and message in lines[-1] and sum(x.startswith("error") for x in lines) == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    # Euler on a model whose sampler config spaces timesteps by linspace (fractional timesteps): one line
    r = run_bf("export", tmp / "m.bfq", "--out", tmp_path / "x", "--scheduler", "euler")
    assert r.returncode == 1 and "euler with timestep_spacing 'linspace" in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "x").exists()
    for option, value in [("--scheduler", "lms"), ("--steps", "0")]:  # refused by click's own checks, before any work
        r = run_bf("export", tmp / "m.bfq", "--out", tmp_path / "x", option, value)
        assert r.returncode == 2 and f"Invalid value for '{option}'" in r.stderr, r.stderr


def test_size_and_sampler_are_refused_before_the_weights_load(exported, tmp_path, monkeypatch):
    """An image size the UNet cannot take and a sampler whose timesteps the table cannot hold are refused from the
    model's configs: the weights never load (for SDXL that is a minute)."""
    import re

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from bf.errors import BfError
    from bf.export.exporter import ExportRequest, export_model

    tmp, _, _ = exported
    for cls in (UNet2DConditionModel, AutoencoderKL):
        for method in ("from_config", "from_pretrained"):
            monkeypatch.setattr(cls, method, lambda *a, **k: pytest.fail("the weights loaded"))
    for req, message in ((ExportRequest(target="onnx", height=72), "--height 72: this UNet halves its latents 8x, so image "
                                                                   "sizes must be multiples of 64 (nearest: 64)"),
                         (ExportRequest(target="onnx", width=200), "multiples of 64 (nearest: 192)"),
                         (ExportRequest(target="onnx", scheduler="euler"), "euler with timestep_spacing 'linspace")):  # fmt: skip
        with pytest.raises(BfError, match=re.escape(message)):
            export_model(tmp / "m.bfq", tmp_path / "x", req)
    assert not (tmp_path / "x").exists()
