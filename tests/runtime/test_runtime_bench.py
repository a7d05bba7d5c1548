"""bf bench on the CPU with ort: the report's format (figures are not asserted, only that they are there and sane)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from conftest import run_bf


def bench(*args, cache):
    return run_bf("bench", *args, cache=cache)


@pytest.fixture(scope="module")
def quantized_bfq(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    assert run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", tmp / "m.bfq").returncode == 0
    return tmp / "m.bfq"


@pytest.mark.slow
def test_bench_a_bfq_against_its_fp_baseline_writes_json_and_plot(quantized_bfq, tmp_path):
    r = bench(quantized_bfq, "--batch", "1,2", "--runs", "2", "--warmup", "1", "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png",
              cache=tmp_path / "cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["backend"] == "ort" and res["device"].startswith("cpu")
    q, b = res["quantized"], res["baseline"]
    for run in (q, b):
        assert set(run["run"]["stages"]) == {"text_encoder", "unet_step_batch1", "unet_step_batch2", "vae_decoder"}
        assert all(s["runs"] == 2 and 0 < s["min_ms"] <= s["median_ms"] <= s["max_ms"] for s in run["run"]["stages"].values())
        e2e = run["run"]["end_to_end"]
        assert e2e["steps"] == 50 and e2e["images"] == 1 and e2e["seconds"] >= e2e["unet_s"] > 0
    assert q["sizes"]["packed_unet_bytes"] > 0 and b["sizes"]["packed_unet_bytes"] is None
    # onnx-std stores the packed codes; the baseline graph holds every weight in float32
    assert q["sizes"]["unet_deployed_bytes"] < 0.5 * b["sizes"]["unet_deployed_bytes"]
    assert res["ratios"]["unet_deployed_bytes"] == q["sizes"]["unet_deployed_bytes"] / b["sizes"]["unet_deployed_bytes"]
    assert res["ratios"]["unet_step_batch2_time"] > 0
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unet step batch2" in r.stdout and "ratio" in r.stdout  # the table
    # the exports are cached: a second run exports nothing
    again = bench(quantized_bfq, "--runs", "1", "--warmup", "0", "--no-end-to-end", "--json", "-", cache=tmp_path / "cache")
    assert again.returncode == 0 and "exporting" not in again.stderr, again.stderr
    assert json.loads(again.stdout)["settings"]["batches"] == [2]


def test_bench_bad_input_gets_one_line(quantized_bfq, tmp_path):
    cases = [
        (("--batch", "0"), "batch sizes must be at least 1"),
        (("--batch", "two"), "expected comma-separated batch sizes"),
        (("--height", "100"), "multiples of 64 (nearest: --height 128"),
        (("--steps", "7"), "export again"),
    ]
    for args, message in cases:
        r = bench(quantized_bfq, *args, "--runs", "1", "--baseline", "none", "--no-end-to-end", cache=tmp_path / "cache")
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = bench(tmp_path / "nowhere", cache=tmp_path / "cache")
    assert r.returncode == 1 and "no manifest.json" in r.stderr.strip().splitlines()[-1]


def test_gpu_backends_without_a_gpu_stop_before_any_export(quantized_bfq, tmp_path):
    from bf.runtime.cuda_runtime import gpu_count

    if gpu_count() != 0:
        pytest.skip("a GPU is visible, or no CUDA runtime library to ask")
    for backend in ("torch", "trt"):
        r = bench(quantized_bfq, "--backend", backend, cache=tmp_path / "cache")
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"error: --backend {backend} runs on a CUDA GPU and none is visible here; use --backend ort"
        ], r.stderr
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing exported
