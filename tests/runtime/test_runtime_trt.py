"""The TensorRT backend: what runs without a GPU its engines can use (its refusals; the ctypes CUDA
runtime on a GPU); the engine run (--target trt) skips where TensorRT is absent. No test runs TensorRT
for RTX engines: that needs an RTX-class GPU."""

import json

import numpy as np
import pytest

from bf.errors import BfError
from bf.format.export_manifest import GRAPHS
from bf.runtime.backend_trt import TrtBackend, check_engines_fit
from bf.runtime.exported import ExportedModel


def fake_export(tmp_path, engines=None) -> ExportedModel:
    from bf.format.export_manifest import ExportManifest
    from tests.format.test_export_manifest import MINIMAL

    return ExportedModel(tmp_path, ExportManifest.from_json({**MINIMAL, "target": "onnx", "engines": engines}))


def test_an_export_without_engines_is_refused(tmp_path):
    with pytest.raises(BfError, match="has no TensorRT engines; export with --target trt or trt-rtx, or use --backend ort"):
        TrtBackend(fake_export(tmp_path))


def rtx_engines(gpus):
    return {n: {"file": f"engines/{n}.plan", "runtime": "tensorrt_rtx", "tensorrt": "1.7.1.116", "gpus": gpus} for n in GRAPHS}


def test_rtx_engines_on_a_gpu_they_were_not_built_for_are_refused_in_one_line(tmp_path):
    model = fake_export(tmp_path, rtx_engines(["86", "89", "120"]))
    check_engines_fit(model, model.manifest.engines, "sm_89")  # one of its targets: accepted
    with pytest.raises(BfError) as e:
        check_engines_fit(model, model.manifest.engines, "sm_90")  # an H100/H200
    msg = str(e.value)
    assert "TensorRT for RTX engines were built for compute capability 86, 89, 120 and this GPU is sm_90" in msg
    assert "TensorRT for RTX does not build for it (RTX-class GPUs: 75, 80, 86, 89, 120, 121): use --backend torch or ort" in msg
    assert "\n" not in msg
    with pytest.raises(BfError, match="sm_120; export again with --target trt-rtx --gpu-arch 120, or use --backend torch or ort"):
        check_engines_fit(model, rtx_engines(["86"]), "sm_120")


def test_tensorrt_engines_run_only_on_the_gpu_they_were_built_on(tmp_path):
    old = {n: {"file": f"engines/{n}.plan", "tensorrt": "10.9", "gpu": "sm_86"} for n in GRAPHS}  # manifests before "gpus"
    model = fake_export(tmp_path, old)
    check_engines_fit(model, old, "sm_86")
    with pytest.raises(BfError, match=r"built for TensorRT 10\.9 on sm_86, this GPU is sm_90; export again on this machine"):
        check_engines_fit(model, old, "sm_90")


def test_without_a_gpu_the_trt_backend_says_so_first(tmp_path):
    from bf.runtime.cuda_runtime import gpu_count

    if gpu_count() != 0:
        pytest.skip("a GPU is visible, or no CUDA runtime library to ask")
    with pytest.raises(BfError, match="runs TensorRT engines on a CUDA GPU and none is visible here; use --backend ort"):
        TrtBackend(fake_export(tmp_path, rtx_engines(["86"])))


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
    from bf.runtime.generation import GenerationRequest, generate

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
