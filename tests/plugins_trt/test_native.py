"""plugins_trt's decode library (CPU here, CUDA on a GPU) and ONNX Runtime op, against the numpy reference."""

from __future__ import annotations

import ctypes

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REPO
from onnx import helper

from bf.errors import BfError
from bf.format.dequant_op import DOMAIN, OP_TYPE, OP_VERSION, DequantSpec, c_header, reference_dequant
from bf.format.grid import Grid
from bf.format.packing import pack_codes
from bf.native import DECODE, find_library

GRIDS = [Grid(b, k) for k in ("balanced", "plain") for b in range(1, 9)]
SHAPES = [(1, 1), (3, 1), (7, 5), (33, 17, 3, 3), (5, 1001), (64, 40)]


def test_the_generated_contract_header_is_current():
    assert (REPO / "plugins_trt" / "include" / "bf_op_contract.h").read_text() == c_header(), (
        "regenerate: python -m bf.format.dequant_op > plugins_trt/include/bf_op_contract.h"
    )


@pytest.fixture(scope="module")
def lib(native_build):
    from bf.decode_kernels import DecodeLibrary

    return DecodeLibrary(native_build / DECODE.file_name)


def random_weight(rng, spec: DequantSpec, scale_dtype=np.float32):
    codes = pack_codes(rng.integers(0, spec.grid.levels, spec.shape), spec.packing)
    scale = (rng.random(spec.shape[0]) * 0.1 + 1e-3).astype(scale_dtype)
    return codes, scale, reference_dequant(codes, scale.astype(np.float32), spec)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).view(np.uint16)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.kind}{g.bits}")
def test_cpu_decoder_is_bit_exact(lib, grid):
    rng = np.random.default_rng(grid.bits + 10 * (grid.kind == "plain"))
    for shape in SHAPES:
        spec = DequantSpec(shape, grid)
        codes, scale, ref = random_weight(rng, spec)
        assert np.array_equal(lib.decode_cpu(codes, scale, spec).view(np.uint32), ref.view(np.uint32)), shape
        assert np.array_equal(lib.decode_cpu(codes, scale, spec, "float16").view(np.uint16), ref.astype(np.float16).view(np.uint16))
        assert np.array_equal(lib.decode_cpu(codes, scale, spec, "bfloat16"), bfloat16_bits(ref))
        codes, scale16, ref16 = random_weight(rng, spec, np.float16)
        assert np.array_equal(lib.decode_cpu(codes, scale16, spec).view(np.uint32), ref16.view(np.uint32))


def test_half_and_bfloat16_rounding_edges(lib):
    """Products spanning subnormal halves, exact ties and overflow to inf round as numpy and ml_dtypes do."""
    rng = np.random.default_rng(5)
    spec = DequantSpec((4096, 256), Grid(8, "plain"))
    codes = pack_codes(np.tile(np.arange(256), (4096, 1)), spec.packing)  # every level -128..127 in every row
    scale = (2.0 ** rng.uniform(-34, 10, 4096)).astype(np.float32)
    scale[:8] = [2.0**-24, 2.0**-25, 3 * 2.0**-26, 65504 / 127, 65520 / 127, 1e30, 1.0, 2.0**-14]
    ref = reference_dequant(codes, scale, spec)
    with np.errstate(over="ignore"):
        half = ref.astype(np.float16)
    assert np.isinf(half).any() and (np.abs(half) < 2**-14).any()
    assert np.array_equal(lib.decode_cpu(codes, scale, spec, "float16").view(np.uint16), half.view(np.uint16))
    assert np.array_equal(lib.decode_cpu(codes, scale, spec, "bfloat16"), bfloat16_bits(ref))


def test_decoder_refuses_bad_input_with_its_reason(lib):
    spec = DequantSpec((8, 9), Grid(2))
    codes, scale, _ = random_weight(np.random.default_rng(0), spec)
    with pytest.raises(BfError, match="codes buffer size does not match"):
        lib.decode_cpu(codes[:-4], scale, spec)
    desc = lib._desc(spec, "float32", "float32")
    desc.levels = 4
    out = np.empty(spec.shape, np.float32)
    status = lib._lib.bf_decode_cpu(ctypes.byref(desc), codes.ctypes.data, codes.size, scale.ctypes.data, out.ctypes.data)
    assert lib._lib.bf_status_string(status).decode().startswith("levels/per_field/field_bits do not match the grid")


def test_library_version_and_missing_library_errors(native_build, monkeypatch, tmp_path):
    import bf.decode_kernels as dk

    built = dk.ABI_VERSION  # what the library was just built with
    monkeypatch.setattr(dk, "ABI_VERSION", 99)
    with pytest.raises(BfError, match=f"has ABI version {built}, this bf needs 99: rebuild it"):
        dk.DecodeLibrary(native_build / DECODE.file_name)
    with pytest.raises(BfError, match=r"no such file .*make plugins"):
        find_library(DECODE, tmp_path / "nope.so")
    monkeypatch.setenv(DECODE.env_var, str(native_build / DECODE.file_name))
    assert find_library(DECODE) == native_build / DECODE.file_name
    monkeypatch.setenv(DECODE.env_var, str(tmp_path / "missing.so"))
    try:  # a stale variable falls through to the other places, and the error lists every place looked in
        assert find_library(DECODE) != tmp_path / "missing.so"
    except BfError as e:
        assert str(tmp_path / "missing.so") in str(e) and "plugins_trt/build" in str(e) and "BF_DECODE_LIB" in str(e)


def one_node_model(spec: DequantSpec, codes: np.ndarray, scale: np.ndarray, attrs: dict | None = None) -> bytes:
    node = helper.make_node(OP_TYPE, ["codes", "scale"], ["w"], domain=DOMAIN, **(attrs or spec.attributes()))
    graph = helper.make_graph(
        [node],
        "g",
        [],
        [helper.make_tensor_value_info("w", spec.dtype, None)],
        [onnx.numpy_helper.from_array(codes, "codes"), onnx.numpy_helper.from_array(scale, "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, OP_VERSION)], ir_version=8)
    return model.SerializeToString()


def ort_session(model: bytes, library) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.kind}{g.bits}")
def test_onnxruntime_runs_the_custom_op(ort_op_library, grid):
    rng = np.random.default_rng(grid.bits)
    for shape, dtype, scale_dtype in [((33, 17, 3, 3), 1, np.float32), ((7, 5), 10, np.float16), ((5, 1001), 1, np.float16)]:
        spec = DequantSpec(shape, grid, dtype)
        codes, scale, ref = random_weight(rng, spec, scale_dtype)
        (got,) = ort_session(one_node_model(spec, codes, scale), ort_op_library).run(None, {})
        want = ref if dtype == 1 else ref.astype(np.float16)
        assert got.dtype == want.dtype and got.shape == shape
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_onnxruntime_op_refuses_bad_attributes(ort_op_library):
    spec = DequantSpec((8, 9), Grid(2))
    codes, scale, _ = random_weight(np.random.default_rng(0), spec)
    attrs = spec.attributes()
    for change, message in [({"bits": 9}, "bits 9 is outside 1..8"), ({"levels": 4}, "does not match a 2-bit balanced grid")]:
        with pytest.raises(Exception, match=message):
            ort_session(one_node_model(spec, codes, scale, {**attrs, **change}), ort_op_library).run(None, {})
    with pytest.raises(Exception, match="codes must be a uint8 buffer of 28 bytes"):
        ort_session(one_node_model(spec, np.zeros(32, np.uint8), scale), ort_op_library).run(None, {})


# --- on a GPU -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_lib(lib):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not lib.has_cuda:
        pytest.fail("the decode library was built without CUDA although nvcc should be present")
    return lib


@pytest.mark.gpu
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.kind}{g.bits}")
def test_cuda_decoder_is_bit_exact(cuda_lib, grid):
    import torch

    rng = np.random.default_rng(100 + grid.bits)
    shapes = [*SHAPES, tuple(int(d) for d in rng.integers(1, 50, 4)), (1280, 1280, 3, 3)]
    for shape in shapes:
        for scale_dtype in (np.float32, np.float16):
            spec = DequantSpec(shape, grid)
            codes, scale, ref = random_weight(rng, spec, scale_dtype)
            c, s = torch.from_numpy(codes).cuda(), torch.from_numpy(scale).cuda()
            for dtype, want in [(torch.float32, ref), (torch.float16, ref.astype(np.float16)), (torch.bfloat16, None)]:
                out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")  # poisoned: every value must be written
                cuda_lib.decode_cuda(c, s, spec, out=out)
                torch.cuda.synchronize()
                got = out.view(torch.int16 if dtype != torch.float32 else torch.int32).cpu().numpy()
                expect = bfloat16_bits(ref).view(np.int16) if want is None else want.view(got.dtype)
                assert np.array_equal(got, expect), (shape, dtype, scale_dtype)


@pytest.mark.gpu
def test_cuda_select_path_covers_every_byte_and_sign(cuda_lib):
    """3-level weights into 16-bit outputs pick values by byte permutes from a table: every packed byte
    value at every field position of a thread's chunk, scales of both signs (so -0.0 too), same bits."""
    import torch

    spec = DequantSpec((6, 243 * 5 * 8), Grid(1))  # a multiple of 8 values a row: the vector path
    levels = np.stack([np.arange(243) // 3**t % 3 for t in range(5)], axis=1).reshape(-1)  # byte f's digits
    rng = np.random.default_rng(11)
    codes_int = np.stack([np.roll(np.repeat(levels.reshape(243, 5), 8, axis=0).reshape(-1), 5 * r) for r in range(6)])
    codes = pack_codes(codes_int, spec.packing)
    for scale in (np.array([0.05, -0.05, 1e-3, -7.0, 65504.0, -6e-8], np.float32), rng.normal(size=6).astype(np.float16)):
        ref = reference_dequant(codes, scale.astype(np.float32), spec)
        c, s = torch.from_numpy(codes).cuda(), torch.from_numpy(scale).cuda()
        for dtype, want in [(torch.float16, ref.astype(np.float16).view(np.int16)), (torch.bfloat16, bfloat16_bits(ref).view(np.int16))]:
            out = torch.full(spec.shape, float("nan"), dtype=dtype, device="cuda")
            cuda_lib.decode_cuda(c, s, spec, out=out)
            assert np.array_equal(out.view(torch.int16).cpu().numpy(), want), (dtype, scale.dtype)


@pytest.mark.gpu
def test_cuda_decoder_handles_unaligned_outputs(cuda_lib):
    """A destination that is not 16-byte aligned takes the one-value-per-thread kernel, same result."""
    import torch

    spec = DequantSpec((64, 72), Grid(2))
    codes, scale, ref = random_weight(np.random.default_rng(3), spec)
    base = torch.full((64 * 72 + 1,), float("nan"), device="cuda")
    out = base[1:].view(64, 72)
    cuda_lib.decode_cuda(torch.from_numpy(codes).cuda(), torch.from_numpy(scale).cuda(), spec, out=out)
    assert np.array_equal(out.cpu().numpy(), ref) and torch.isnan(base[0])


@pytest.mark.gpu
@pytest.mark.parametrize("max_blocks", [0, 3])
def test_batched_cuda_decode_equals_the_reference(cuda_lib, max_blocks):
    """Many weights of mixed widths, grids and shapes in one call (and one launch per 384 weights),
    with every block its own work, or 3 blocks looping over all of it."""
    import torch

    rng = np.random.default_rng(7)
    weights, wants = [], []
    for i in range(400):  # more than one launch's worth
        grid = GRIDS[i % len(GRIDS)]
        shape = SHAPES[i % len(SHAPES)] if i % 3 else (int(rng.integers(1, 40)), int(rng.integers(1, 40)) * 8)
        spec = DequantSpec(shape, grid)
        codes, scale, ref = random_weight(rng, spec, np.float16 if i % 2 else np.float32)
        weights.append((torch.from_numpy(codes).cuda(), torch.from_numpy(scale).cuda(), spec))
        wants.append(ref.astype(np.float16))
    outs = [torch.full(s.shape, float("nan"), dtype=torch.float16, device="cuda") for _, _, s in weights]
    cuda_lib.decode_cuda_batch(weights, outs, max_blocks)
    for out, want in zip(outs, wants, strict=True):
        assert np.array_equal(out.cpu().numpy().view(np.uint16), want.view(np.uint16))
    with pytest.raises(BfError, match="output dtype must be"):
        cuda_lib.decode_cuda_batch(weights[:2], [outs[0], outs[1].float()])


def test_tensorrt_registration_errors_name_the_fix(tmp_path, monkeypatch):
    """bf.native.register_trt_plugin against a stand-in of TensorRT's registry (TensorRT is not installable here)."""
    from types import SimpleNamespace

    from bf.native import register_trt_plugin

    lib = tmp_path / "libbf_trt_plugin.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.delenv("BF_PLUGIN_LIB", raising=False)

    def trt_with(load, creator):
        registry = SimpleNamespace(load_library=load, get_creator=lambda name, version, ns: creator)
        return SimpleNamespace(__name__="tensorrt", __version__="10.9.0", get_plugin_registry=lambda: registry)

    def refuse(path):
        raise RuntimeError("undefined symbol: _ZN8nvinfer1")

    assert register_trt_plugin(trt_with(lambda p: object(), object()), lib) == lib
    with pytest.raises(BfError, match=r"TensorRT 10.9.0 could not load .*undefined symbol.*rebuild it against this TensorRT"):
        register_trt_plugin(trt_with(refuse, None), lib)
    with pytest.raises(BfError, match=r"does not provide LowBitDequant version 1: it was built for another bf"):
        register_trt_plugin(trt_with(lambda p: object(), None), lib)
    with pytest.raises(BfError, match=r"tensorrt 10\.9\.0 could not load .* \(see its log\); rebuild it against this TensorRT"):
        register_trt_plugin(trt_with(lambda p: None, None), lib)  # load_library's failure without an exception
    with pytest.raises(BfError, match=r"no such file .*make plugins"):
        register_trt_plugin(trt_with(lambda p: object(), object()), tmp_path / "missing.so")
