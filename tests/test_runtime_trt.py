"""The TensorRT backend: what runs without TensorRT (its refusals, the ctypes CUDA runtime on a GPU);
the engine runs skip where TensorRT is absent (it cannot be installed on this project's machines)."""

import json

import numpy as np
import pytest

from bf.errors import BfError
from bf.runtime.backend_trt import TrtBackend
from bf.runtime.exported import ExportedModel


def fake_export(tmp_path, engines=None) -> ExportedModel:
    return ExportedModel(tmp_path, {"target": "onnx", "engines": engines})


def test_an_export_without_engines_is_refused(tmp_path):
    with pytest.raises(BfError, match="has no TensorRT engines; export with --target trt, or use --backend ort"):
        TrtBackend(fake_export(tmp_path))


def test_engines_for_another_gpu_or_tensorrt_are_refused(tmp_path):
    trt = pytest.importorskip("tensorrt")
    engines = {n: {"file": f"engines/{n}.plan", "tensorrt": "0.0.0", "gpu": "sm_00"} for n in ("text_encoder", "unet", "vae_decoder")}
    with pytest.raises(BfError, match=f"built for TensorRT 0.0.0 on sm_00, this machine has TensorRT {trt.__version__}"):
        TrtBackend(fake_export(tmp_path, {**engines, "plugin": "engines/libbf_trt_plugin.so"}))


def test_without_tensorrt_the_error_names_the_install(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    engines = {"plugin": "x", **{n: {"tensorrt": "10", "gpu": "sm_90"} for n in ("text_encoder", "unet", "vae_decoder")}}
    with pytest.raises(BfError, match=r"needs TensorRT's Python package: pip install 'bf\[trt\]'"):
        TrtBackend(fake_export(tmp_path, engines))


@pytest.fixture
def cuda():
    """The ctypes CUDA runtime the trt backend uses (skips where libcudart or a GPU is missing)."""
    from bf.runtime.cuda_runtime import CudaRuntime

    try:
        return CudaRuntime()
    except BfError as e:
        pytest.skip(str(e))


@pytest.mark.gpu
def test_cuda_runtime_round_trip(cuda):
    a = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    ptr = cuda.malloc(a.nbytes)
    cuda.to_device(ptr, a)
    assert np.array_equal(cuda.from_device(ptr, a.shape, np.float32), a)
    cuda.free(ptr)
    assert cuda.compute_capability().startswith("sm_")


def test_trt_backend_runs_an_export(tmp_path):
    """Where TensorRT and a GPU exist: export the tiny model with --target trt and compare with ort (>= 35 dB)."""
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from conftest import run_bf

    from bf.export.check import psnr_db
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model
    from bf.runtime.backend_ort import OrtBackend
    from bf.runtime.pipeline import GenerationRequest, generate

    write_random_model(ARCHITECTURES["sd15-tiny"], tmp_path / "tiny", seed=0, log=lambda m: None)
    assert run_bf("quantize", "--model", tmp_path / "tiny", "--bits", "2", "--out", tmp_path / "m.bfq").returncode == 0
    r = run_bf("export", tmp_path / "m.bfq", "--target", "trt", "--out", tmp_path / "e", "--steps", "10", "--fp32")
    assert r.returncode == 0, r.stderr
    model = ExportedModel.open(tmp_path / "e")
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["engines"]
    req = GenerationRequest("a red circle", seed=1)
    ours, ref = generate(model, TrtBackend(model), req), generate(model, OrtBackend(model), req)
    assert psnr_db(ours.images / 255.0, ref.images / 255.0) >= 35
    graphed = TrtBackend(model, cuda_graph=True)
    assert np.array_equal(generate(model, graphed, req).images, ours.images)  # the replayed graph computes what the engine does
    assert len(graphed.graphs) == 1


@pytest.mark.gpu
def test_cuda_runtime_graph_capture_replays_the_captured_copy(cuda):
    """The capture/instantiate/launch calls the trt backend's --cuda-graph uses, on a device-to-device copy."""
    a, b = (np.random.default_rng(i).standard_normal(1000).astype(np.float32) for i in (1, 2))
    src, dst = cuda.malloc(a.nbytes), cuda.malloc(a.nbytes)
    cuda.to_device(src, a)
    cuda.to_device(dst, np.zeros_like(a))
    cuda.begin_capture()
    cuda.copy_async(dst, src, a.nbytes)
    exe = cuda.end_capture()
    assert not np.array_equal(cuda.from_device(dst, a.shape, np.float32), a)  # captured, not run
    cuda.graph_launch(exe)
    assert np.array_equal(cuda.from_device(dst, a.shape, np.float32), a)
    cuda.to_device(src, b)  # same addresses, new contents: the replay copies them
    cuda.graph_launch(exe)
    assert np.array_equal(cuda.from_device(dst, b.shape, np.float32), b)
    cuda.graph_destroy(exe)
    cuda.free(src)
    cuda.free(dst)
