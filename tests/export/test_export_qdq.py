"""onnx-qdq and the engine targets: DequantizeLinear weights equal the .bfq bit for bit, the float16
copy for strongly typed builds, TensorRT for RTX engines built on this CPU, and their refusals."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bf.errors import BfError  # noqa: E402
from bf.export.fp16_graph import to_fp16  # noqa: E402
from bf.export.qdq_lowering import lower_graph_qdq, qdq_form  # noqa: E402
from bf.format import Grid, QuantizedLayer  # noqa: E402
from bf.format.dequant_op import DOMAIN, OP_TYPE, DequantSpec  # noqa: E402
from bf.ort_options import session_options  # noqa: E402


def run(model: onnx.ModelProto, feeds=None) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), session_options(ort), providers=["CPUExecutionProvider"]).run(None, feeds or {})


def dequant_graph(layer: QuantizedLayer, matmul: bool = False) -> onnx.ModelProto:
    """One LowBitDequant node; with ``matmul`` the traced linear-layer pattern x @ Transpose(W)."""
    spec = DequantSpec(layer.shape, layer.grid)
    nodes = [helper.make_node(OP_TYPE, ["codes", "scale"], ["w"], domain=DOMAIN, name="dq", **spec.attributes())]
    inputs, out = [], helper.make_tensor_value_info("w", TensorProto.FLOAT, list(layer.shape))
    if matmul:
        nodes += [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, layer.shape[1]])]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, layer.shape[0]])
    inits = [numpy_helper.from_array(layer.codes, "codes"), numpy_helper.from_array(layer.scale, "scale")]
    graph = helper.make_graph(nodes, "one", inputs, [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)], ir_version=8)


def random_layer(grid: Grid, shape, seed: int) -> QuantizedLayer:
    rng = np.random.default_rng(seed)
    levels = rng.integers(grid.qmin, grid.qmax + 1, size=shape)
    levels.flat[0], levels.flat[-1] = grid.qmin, grid.qmax  # both ends of the grid in every layer
    scale = ((rng.random(shape[0]) + 0.1) * rng.choice([-1, 1], shape[0]) * 10.0 ** rng.integers(-4, 2, shape[0])).astype(np.float32)
    return QuantizedLayer.from_levels("x", levels, scale, grid)


def test_each_grid_gets_the_narrowest_integer_type_that_holds_its_levels():
    forms = {(k, b): qdq_form(Grid(b, k)) for k in ("balanced", "plain") for b in range(1, 9)}
    assert [b for b in range(1, 9) if forms["balanced", b] == "int4"] == [1, 2, 3]
    assert [b for b in range(1, 9) if forms["balanced", b] == "int8"] == [4, 5, 6, 7]
    assert forms["balanced", 8] == "float"  # -128..+128: 257 levels
    assert [b for b in range(1, 9) if forms["plain", b] == "int4"] == [1, 2, 3, 4]
    assert [b for b in range(1, 9) if forms["plain", b] == "int8"] == [5, 6, 7, 8]


@pytest.mark.parametrize("kind", ["balanced", "plain"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_qdq_weights_equal_the_packed_layer_bit_for_bit(kind, bits):
    grid = Grid(bits, kind)
    expected_type = {"int4": TensorProto.INT4, "int8": TensorProto.INT8, "float": TensorProto.FLOAT}[qdq_form(grid)]
    for shape in [(3, 7), (5, 3, 3, 3), (1, 1), (17, 33)]:
        layer = random_layer(grid, shape, bits)
        low = lower_graph_qdq(dequant_graph(layer))
        onnx.checker.check_model(low, full_check=True)
        assert all(o.domain != DOMAIN for o in low.opset_import) and low.ir_version >= 10
        stored = [t for t in low.graph.initializer if t.name.endswith(("/levels", "/weight"))]
        assert [t.data_type for t in stored] == [expected_type]
        (out,) = run(low)
        assert out.dtype == np.float32 and np.array_equal(out, layer.dequantize()), (kind, bits, shape)


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_a_linear_weight_is_stored_transposed_and_feeds_its_matmul(bits):
    layer = random_layer(Grid(bits), (6, 10), bits)
    graph = dequant_graph(layer, matmul=True)
    low = lower_graph_qdq(graph)
    assert [n.op_type for n in low.graph.node] == ["DequantizeLinear" if bits < 8 else "Identity", "MatMul"]
    dq = low.graph.node[0]
    if bits < 8:
        assert helper.get_attribute_value(dq.attribute[0]) == 1  # per output channel = axis 1 of W^T
    x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    (y,) = run(low, {"x": x})
    assert np.array_equal(y, x @ layer.dequantize().T)


def test_a_node_that_cannot_be_lowered_is_one_line():
    layer = random_layer(Grid(2), (4, 4), 0)
    graph = dequant_graph(layer)
    for a in graph.graph.node[0].attribute:
        if a.name == "bits":
            a.i = 9
    with pytest.raises(BfError, match=r"dq: cannot lower to DequantizeLinear: bits must be an integer in 1\.\.8"):
        lower_graph_qdq(graph)


@pytest.fixture(scope="module")
def qdq_export(tiny_model, tmp_path_factory):
    """The tiny model at a mix of widths (every qdq form), exported with --target onnx-qdq and onnx-std."""
    from conftest import run_bf
    from safetensors import safe_open

    from bf.format import candidate_layers
    from bf.trainer.recipe import make_recipe

    tmp = tmp_path_factory.mktemp("qdq")

    shapes = {}
    for f in sorted((tiny_model / "unet").glob("*.safetensors")):
        with safe_open(f, "np") as sf:
            shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})  # noqa: SIM118
    names = sorted(candidate_layers(shapes))
    recipe = make_recipe("balanced", {n: [1, 2, 3, 4, 8][i % 5] for i, n in enumerate(names)}, kind="every qdq form")
    (tmp / "recipe.json").write_text(json.dumps(recipe))
    r = run_bf("quantize", "--model", tiny_model, "--recipe", tmp / "recipe.json", "--out", tmp / "m.bfq")
    assert r.returncode == 0, r.stderr
    r = run_bf("export", tmp / "m.bfq", "--target", "onnx-qdq", "--out", tmp / "qdq", "--steps", "4", "--json")
    assert r.returncode == 0, r.stderr
    s = run_bf("export", tmp / "m.bfq", "--target", "onnx-std", "--out", tmp / "std", "--steps", "4", "--no-check")
    assert s.returncode == 0, s.stderr
    return tmp, json.loads(r.stdout)


def test_onnx_qdq_export_is_checked_and_equals_the_standard_lowering(qdq_export):
    from bf.format import Checkpoint

    tmp, manifest = qdq_export
    layers = Checkpoint.load(tmp / "m.bfq").layers
    assert manifest["graph_form"] == "qdq" and manifest["plugin"] is None and manifest["opset"] == 21
    assert manifest["graphs"]["unet"]["qdq_weights"] == len(layers) and manifest["graphs"]["unet"]["dequant_ops"] == 0
    assert all(c["ok"] and c["psnr_db"] >= 40 for c in manifest["check"])
    qdq, std = onnx.load(tmp / "qdq" / "unet.onnx"), onnx.load(tmp / "std" / "unet.onnx")
    types = {t.data_type for t in qdq.graph.initializer if t.name.endswith("/levels")}
    assert types == {TensorProto.INT4, TensorProto.INT8}
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "step": np.array([2]),
             "encoder_hidden_states": rng.standard_normal((2, 77, manifest["hidden_size"])).astype(np.float32)}  # fmt: skip
    a, b = run(qdq, feeds)[0], run(std, feeds)[0]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_the_float16_copy_keeps_float32_io_and_resize_scales(qdq_export):
    from bf.export.check import psnr_db

    tmp, manifest = qdq_export
    for graph in ("unet", "vae_decoder"):
        m = onnx.load(tmp / "qdq" / f"{graph}.onnx")
        h = to_fp16(m)
        onnx.checker.check_model(h, full_check=True)
        assert [i.type.tensor_type.elem_type for i in h.graph.input] == [i.type.tensor_type.elem_type for i in m.graph.input]
        assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in h.graph.output)
        floats = [t.name for t in h.graph.initializer if t.data_type == TensorProto.FLOAT]
        resize_inputs = {n.input[i] for n in h.graph.node if n.op_type == "Resize" for i in (1, 2) if i < len(n.input)}
        assert set(floats) <= resize_inputs, floats
    rng = np.random.default_rng(2)
    feeds = {
        "vae_decoder": {"latent": (rng.standard_normal((1, 4, 8, 8)) * 3).astype(np.float32)},
        "unet": {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "step": np.array([1]),
                 "encoder_hidden_states": rng.standard_normal((2, 77, manifest["hidden_size"])).astype(np.float32)},
    }  # fmt: skip
    for graph, feed in feeds.items():
        m = onnx.load(tmp / "qdq" / f"{graph}.onnx")
        ref, half = run(m, feed)[0], run(to_fp16(m), feed)[0]
        assert psnr_db(half, ref) >= 30, graph  # the export's float16 floor


def test_the_float16_copy_passes_through_outputs_that_no_node_computes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("x", "c", "y")]
    cv = np.array([1.5, -2.0], np.float32)
    c = numpy_helper.from_array(cv, "c")
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "g", [x], outs, initializer=[c])
    h = to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8))
    onnx.checker.check_model(h, full_check=True)
    a = np.array([0.25, 3.0], np.float32)
    got_x, got_c, got_y = run(h, {"x": a})
    assert np.array_equal(got_x, a) and np.array_equal(got_c, cv) and np.array_equal(got_y, a + cv)


def test_engine_option_refusals(qdq_export, tmp_path):
    from conftest import run_bf

    tmp, _ = qdq_export
    cases = [
        (["--target", "onnx", "--weights", "qdq"], "--weights applies to the engine targets"),
        (["--target", "trt", "--gpu-arch", "86"], "--gpu-arch applies to --target trt-rtx"),
        (["--target", "onnx-qdq", "--fp16"], "--fp16 applies to TensorRT engines only"),
    ]
    try:
        import tensorrt_rtx  # noqa: F401

        cases += [
            (["--target", "trt-rtx", "--gpu-arch", "90"], "--gpu-arch 90: TensorRT for RTX"),
            (["--target", "trt-rtx", "--weights", "plugin", "--plugin", tmp_path / "none.so"], "none.so: no such file"),
        ]
    except ImportError:
        cases.append((["--target", "trt-rtx"], "needs TensorRT for RTX's Python package (tensorrt_rtx): pip install 'bf[trt-rtx]'"))
    for args, message in cases:
        r = run_bf("export", tmp / "m.bfq", "--out", tmp_path / "x", "--steps", "4", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and message in lines[-1] and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_a_missing_tensorrt_package_names_its_extra():
    from bf.tensorrt_flavors import TensorRTFlavor

    with pytest.raises(
        BfError, match=r"--target trt-rtx needs TensorRT for RTX's Python package \(no_such_module\): pip install 'bf\[trt-rtx\]'"
    ):
        TensorRTFlavor("trt-rtx", "no_such_module", "TensorRT for RTX", "trt-rtx", 1).load()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "shipped"])
def test_trt_rtx_engines_build_on_this_cpu_and_are_cached(model, qdq_export, tmp_path, monkeypatch):
    """The tiny model at every qdq form, and the shipped model at its 1.99-bit recipe, exported as a user
    would for RTX 30 and 50 series GPUs."""
    trt = pytest.importorskip("tensorrt_rtx")
    from conftest import run_bf

    monkeypatch.setenv("BF_ENGINE_CACHE", str(tmp_path / "cache"))
    bfq = qdq_export[0] / "m.bfq"
    if model == "shipped":  # the shipped BitsFusion model, at its 1.99-bit recipe
        from bf.models.shipped import shipped_bfq

        bfq = shipped_bfq()
    archs = ["86", "120"] if model == "shipped" else ["86"]  # several targets at once: the shipped model's build
    args = ["export", bfq, "--target", "trt-rtx", "--gpu-arch", ",".join(archs), "--steps", "4", "--no-check", "--json"]
    r = run_bf(*args, "--out", tmp_path / "e1")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["graph_form"] == "qdq" and m["precision"] == "fp16" and m["engines"]["plugin"] is None
    runtime = trt.Runtime(trt.Logger(trt.Logger.INTERNAL_ERROR))
    malformed = int(trt.EngineInvalidityDiagnostics.MALFORMED_ENGINE) | int(trt.EngineInvalidityDiagnostics.VERSION_MISMATCH)
    for g in ("text_encoder", "unet", "vae_decoder"):
        e = m["engines"][g]
        assert e["runtime"] == "tensorrt_rtx" and e["gpus"] == archs and e["tensorrt"] == trt.__version__
        blob = (tmp_path / "e1" / e["file"]).read_bytes()
        assert len(blob) == e["bytes"] > 1000
        # No GPU here: the runtime cannot deserialize, but it reads the header (a corrupt one is MALFORMED).
        assert runtime.get_engine_validity(blob)[1] & malformed == 0
        assert runtime.get_engine_validity(b"\0" * len(blob))[1] & malformed
    again = run_bf(*args, "--out", tmp_path / "e2")
    assert again.returncode == 0 and again.stderr.count("engine: cached") == 3, again.stderr
    assert json.loads(again.stdout)["engines"]["unet"]["cache_key"] == m["engines"]["unet"]["cache_key"]
    if model == "tiny":  # other target GPUs are other engines
        other = run_bf(*[a if a != "86" else "89" for a in args], "--out", tmp_path / "e3")
        assert other.returncode == 0 and "engine: cached" not in other.stderr, other.stderr
        assert json.loads(other.stdout)["engines"]["unet"]["gpus"] == ["89"]


def test_ort_backend_runs_a_qdq_export_and_reports_its_provider(qdq_export, tmp_path):
    from conftest import run_bf
    from PIL import Image

    from bf.runtime.backend_ort import choose_providers
    from bf.runtime.cuda_runtime import gpu_count

    tmp, _ = qdq_export
    images = {}
    for form in ("qdq", "std"):
        r = run_bf("infer", tmp / form, "--prompt", "a red circle", "--steps", "4", "--out", tmp_path / f"{form}.png", "--json")
        assert r.returncode == 0, r.stderr
        expected = choose_providers(ort.get_available_providers(), gpu_count(), custom_ops=False)[0]
        assert json.loads(r.stdout)["execution"] == {"backend": "ort", "provider": expected}
        images[form] = np.asarray(Image.open(tmp_path / f"{form}.png"), dtype=np.int16)
    assert np.abs(images["qdq"] - images["std"]).max() <= 1  # the same weights, computed in float32


def test_ort_takes_the_cuda_provider_only_where_it_can_run_the_graphs():
    from bf.runtime.backend_ort import CPU_EP, CUDA_EP, choose_providers

    gpu_build = [CUDA_EP, CPU_EP]
    assert choose_providers(gpu_build, 1, custom_ops=False) == [CUDA_EP, CPU_EP]
    assert choose_providers(gpu_build, None, custom_ops=False) == [CUDA_EP, CPU_EP]  # unknown: let ONNX Runtime try
    assert choose_providers(gpu_build, 0, custom_ops=False) == [CPU_EP]  # no GPU visible
    assert choose_providers(gpu_build, 1, custom_ops=True) == [CPU_EP]  # the op library is CPU-only
    assert choose_providers([CPU_EP], 1, custom_ops=False) == [CPU_EP]  # the CPU wheel


@pytest.mark.slow
def test_plugin_engines_build_with_tensorrt_for_rtx(qdq_export, tmp_path, monkeypatch):
    """Where the plugin was built against TensorRT for RTX (make plugins with TensorRT's headers): the
    UNet engine holds the packed codes through LowBitDequant plugin nodes."""
    pytest.importorskip("tensorrt_rtx")
    from conftest import run_bf

    from bf.native import TRT_PLUGIN, TRT_RTX_ALIAS, find_library

    try:
        plugin = find_library(TRT_PLUGIN)
        find_library(TRT_RTX_ALIAS)
    except BfError as e:
        pytest.skip(f"needs the plugin built for TensorRT for RTX: {e}")
    tmp, _ = qdq_export
    monkeypatch.setenv("BF_ENGINE_CACHE", str(tmp_path / "cache"))
    r = run_bf("export", tmp / "m.bfq", "--target", "trt-rtx", "--weights", "plugin", "--plugin", plugin, "--gpu-arch", "86",
               "--steps", "4", "--no-check", "--json", "--out", tmp_path / "e")  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["graph_form"] == "custom" and m["graphs"]["unet"]["dequant_ops"] > 0
    assert (tmp_path / "e" / m["engines"]["plugin"]).is_file() and m["engines"]["unet"]["bytes"] > 1000


def test_tensorrt_log_lines_reach_the_user_without_the_no_gpu_probe_noise():
    trt = pytest.importorskip("tensorrt_rtx")
    from bf.tensorrt_flavors import make_logger

    shown = []
    logger = make_logger(trt, shown.append)
    logger.log(trt.Logger.WARNING, "ModelImporter.cpp:1071: Make sure input step has Int64 binding.")  # bf binds int64
    logger.log(trt.Logger.ERROR, "Error Code 1: Cuda Runtime (cudaError 35: CUDA driver version is insufficient)")
    logger.log(trt.Logger.WARNING, "a warning\nwith detail")
    logger.log(trt.Logger.ERROR, "an error")
    logger.log(trt.Logger.INFO, "chatter")
    assert shown == ["warning (tensorrt_rtx): a warning", "error (tensorrt_rtx): an error"]
    assert logger.errors == ["an error"] and len(logger.held) == 1  # the probe error is shown only if the build fails


def test_the_float16_copy_keeps_the_micro_conditioning_embedding_in_float32():
    """sin(time_ids x frequencies) from image sizes near 1024: in float16 the phases are off by up to 0.5 rad; the copy
    computes the ops fed by time_ids in float32 up to the first layer (the same graph with another input name does not)."""
    freq = np.exp(-np.log(10000) * np.arange(8) / 8).astype(np.float32)
    w = (np.random.default_rng(0).standard_normal((24, 4)) * 0.1).astype(np.float32)

    def model(name):
        nodes = [helper.make_node("Unsqueeze", [name, "ax"], ["t3"]), helper.make_node("Mul", ["t3", "freq"], ["ph"]),
                 helper.make_node("Sin", ["ph"], ["s"]), helper.make_node("Flatten", ["s"], ["sf"], axis=1),
                 helper.make_node("Concat", ["text_embeds", "sf"], ["cat"], axis=1),
                 helper.make_node("MatMul", ["cat", "w"], ["y"])]  # fmt: skip
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, k]) for n, k in ((name, 2), ("text_embeds", 8))]
        inits = [numpy_helper.from_array(freq, "freq"), numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2]), "ax")]
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)

    errors = {}
    for name in ("time_ids", "other"):
        m = model(name)
        h = to_fp16(m)
        onnx.checker.check_model(h, full_check=True)
        feed = {name: np.array([[1216, 832]], np.float32), "text_embeds": np.ones((1, 8), np.float32)}
        errors[name] = float(np.abs(run(h, feed)[0] - run(m, feed)[0]).max())
    assert errors["time_ids"] < 1e-3 < 5e-3 < errors["other"], errors
