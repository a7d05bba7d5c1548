"""bf infer on the ort backend: parity with the diffusers pipeline on the dequantized model, PNG metadata, bad input."""

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from conftest import run_bf  # noqa: E402

from bf.export.check import psnr_db  # noqa: E402

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def exported_std(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    assert run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", tmp / "m.bfq").returncode == 0
    r = run_bf("export", tmp / "m.bfq", "--target", "onnx-std", "--out", tmp / "onnx", "--steps", "10", "--no-check")
    assert r.returncode == 0, r.stderr
    return tmp


def png_text(path) -> dict[str, str]:
    data, pos, out = path.read_bytes(), 8, {}
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(kind + body) == int.from_bytes(data[pos + 8 + n : pos + 12 + n], "big")
        if kind == b"tEXt":
            k, v = body.split(b"\0", 1)
            out[k.decode("latin-1")] = v.decode("latin-1")
        pos += 12 + n
    return out


def test_ort_matches_the_diffusers_pipeline_on_the_dequantized_model(exported_std):
    from bf.models.diffusers_pipeline import load_model
    from bf.runtime.backend_ort import OrtBackend
    from bf.runtime.exported import ExportedModel
    from bf.runtime.generation import GenerationRequest, generate

    model = ExportedModel.open(exported_std / "onnx")
    ours = generate(model, OrtBackend(model), GenerationRequest(PROMPT, seed=7))
    pipe = load_model(exported_std / "m.bfq", scheduler="pndm").pipe
    h, w = ours.images.shape[1:3]
    ref = pipe(PROMPT, negative_prompt="", num_inference_steps=10, guidance_scale=7.5, height=h, width=w,
               latents=torch.from_numpy(ours.latents), output_type="np").images  # fmt: skip
    assert psnr_db(ours.images.astype(np.float32) / 255, ref.astype(np.float32)) >= 35


def test_the_fp_model_exported_and_run_by_ort_matches_diffusers(tiny_model, tmp_path):
    from bf.models.diffusers_pipeline import load_model
    from bf.runtime.backend_ort import OrtBackend
    from bf.runtime.exported import ExportedModel
    from bf.runtime.generation import GenerationRequest, generate

    r = run_bf("export", tiny_model, "--target", "onnx-std", "--out", tmp_path / "fp", "--steps", "8", "--scheduler", "dpmpp2m")
    assert r.returncode == 0, r.stderr
    model = ExportedModel.open(tmp_path / "fp")
    assert model.manifest.model.quantized is False and model.manifest.graphs["unet"]["dequant_ops"] == 0
    ours = generate(model, OrtBackend(model), GenerationRequest(PROMPT, seed=11, cfg=5.0))
    pipe = load_model(tiny_model, scheduler="dpmpp2m").pipe
    h, w = ours.images.shape[1:3]
    ref = pipe(PROMPT, negative_prompt="", num_inference_steps=8, guidance_scale=5.0, height=h, width=w,
               latents=torch.from_numpy(ours.latents), output_type="np").images  # fmt: skip
    assert psnr_db(ours.images.astype(np.float32) / 255, ref.astype(np.float32)) >= 35


def test_bf_infer_writes_a_png_with_its_settings(exported_std):
    out = exported_std / "img.png"
    r = run_bf("infer", exported_std / "onnx", "--prompt", PROMPT, "--seed", "3", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["files"] == [str(out)] and report["timings"]["unet_s"] > 0
    meta = png_text(out)
    assert meta["prompt"] == PROMPT and meta["seed"] == "3" and meta["steps"] == "10" and meta["scheduler"] == "pndm"
    assert json.loads(meta["bf"])["model_sha256"].startswith("sha256:")
    r2 = run_bf("infer", exported_std / "onnx", "--prompt", PROMPT, "--seed", "3", "--out", exported_std / "again.png")
    assert r2.returncode == 0 and (exported_std / "again.png").read_bytes() == out.read_bytes()  # same seed, same image


def test_the_ort_path_imports_no_torch(exported_std):
    code = (
        "import sys; from bf.runtime.backend_ort import OrtBackend; from bf.runtime.exported import ExportedModel; "
        "from bf.runtime.generation import GenerationRequest, generate; "
        f"m = ExportedModel.open({str(exported_std / 'onnx')!r}); generate(m, OrtBackend(m), GenerationRequest('x', steps=10)); "
        "bad = [n for n in ('torch', 'diffusers', 'transformers') if n in sys.modules]; assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_export_command_to_rerun_keeps_the_exports_settings():
    from types import SimpleNamespace

    from bf.runtime.exported import export_command

    engines = {"target": "trt-rtx", "height": 768, "width": None, "batch": 4, "precision": "fp32", "weights": "plugin",
               "gpu_archs": ["86", "120"], "plugin": "/p/lib.so", "loras": [["/l/a.safetensors", 0.5]]}  # fmt: skip
    m = SimpleNamespace(target="trt-rtx", graph_form="custom", raw={"export_settings": engines})
    assert export_command("m.bfq", m, "ddim", 20) == (
        "bf export m.bfq --target trt-rtx --height 768 --weights plugin --batch 4 --fp32 --gpu-arch 86,120 --plugin /p/lib.so "
        "--lora /l/a.safetensors:0.5 --scheduler ddim --steps 20 --out DIR"
    )
    older = SimpleNamespace(target="trt", graph_form="custom", raw={})  # a manifest without its settings: the graph form tells
    expected = "bf export m.bfq --target trt --weights plugin --scheduler pndm --steps 50 --out DIR"
    assert export_command("m.bfq", older, "pndm", 50) == expected
    onnx = SimpleNamespace(target="onnx-qdq", graph_form="qdq", raw={"export_settings": {**engines, "target": "onnx-qdq", "loras": []}})
    expected = "bf export m.bfq --target onnx-qdq --height 768 --scheduler pndm --steps 50 --out DIR"
    assert export_command("m.bfq", onnx, "pndm", 50) == expected


def test_bad_input_gets_one_line(exported_std, tmp_path):
    d = exported_std / "onnx"
    cases = [
        (["infer", tmp_path, "--prompt", "x"], "no manifest.json"),
        (["infer", d, "--prompt", "  "], "--prompt is empty"),
        (["infer", d, "--prompt", "x", "--steps", "20"], "exported for pndm with 10 steps, not pndm with 20"),
        (["infer", d, "--prompt", "x", "--scheduler", "ddim"], "onnx-std --height 64 --width 64 --scheduler ddim --steps 10 --out DIR"),
        (["infer", d, "--prompt", "x", "--height", "100"], "multiples of 64 (nearest: --height 128, --width 64)"),
        (["infer", d, "--prompt", "x", "--steps", "0"], "must be at least 1"),
    ]
    for args, message in cases:
        r = run_bf(*args, "--out", tmp_path / "x.png")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and message in lines[-1] and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.png").exists()
    # a multiple of 8 the UNet cannot halve three times (its upsampling was traced for even sizes), far from native: one line,
    # the refusal alone with no warning first, and no traceback from ONNX Runtime
    r = run_bf("infer", d, "--prompt", "x", "--height", "2000", "--out", tmp_path / "x.png")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "multiples of 64 (nearest: --height 1984" in r.stderr, r.stderr
    for out, message in [(tmp_path / "x.jpg", "bf infer writes PNG images; give a .png file name"),
                         (tmp_path / "no" / "x.png", "does not exist; create it first")]:  # fmt: skip
        r = run_bf("infer", d, "--prompt", "x", "--out", out)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: --out {out}") and message in lines[0], r.stderr
        assert not out.exists()
    for option, value in [("--seed", "-1"), ("--cfg", "-3"), ("--num-images", "0")]:  # refused by click before any work
        r = run_bf("infer", d, "--prompt", "x", option, value, "--out", tmp_path / "x.png")
        assert r.returncode == 2 and f"Invalid value for '{option}'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_each_image_of_a_batch_is_reproduced_by_its_own_seed(exported_std, tmp_path):
    from PIL import Image

    d = exported_std / "onnx"
    r = run_bf("infer", d, "--prompt", PROMPT, "--seed", "5", "--num-images", "2", "--out", tmp_path / "b.png")
    assert r.returncode == 0, r.stderr
    assert [png_text(tmp_path / f"b-{i}.png")["seed"] for i in (1, 2)] == ["5", "6"]
    r = run_bf("infer", d, "--prompt", PROMPT, "--seed", "6", "--out", tmp_path / "one.png")
    assert r.returncode == 0, r.stderr
    second, alone = (np.asarray(Image.open(tmp_path / f), dtype=np.int16) for f in ("b-2.png", "one.png"))
    assert np.abs(second - alone).max() <= 1  # batched or alone: the same latents, float rounding apart
    first = np.asarray(Image.open(tmp_path / "b-1.png"), dtype=np.int16)
    assert np.abs(first - alone).mean() > 5  # different seeds, different images


@pytest.mark.slow
def test_bf_infer_without_a_directory_exports_the_shipped_model_once(tmp_path):
    from conftest import run_bf

    env_cache = tmp_path / "cache"
    for _ in range(2):
        r = run_bf("infer", "--prompt", PROMPT, "--steps", "50", "--out", tmp_path / "s.png", "--json", cache=env_cache)
        assert r.returncode == 0, r.stderr
    assert "exporting" not in r.stderr  # the second call used the cache
    (exported,) = list(env_cache.iterdir())
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["target"] == "onnx-std" and manifest["model"]["source"].endswith("bf/assets/shapes-sd-1.99bit.bfq")
    from bf.export.exporter import sha256_file
    from bf.format import read_header
    from bf.models.shipped import shipped_bfq

    assert manifest["model"]["sha256"] == sha256_file(shipped_bfq())
    assert read_header(shipped_bfq())["recipe"]["target_bits"] == 1.99  # the shipped BitsFusion model, not a PTQ
    assert json.loads(r.stdout)["settings"]["height"] == 128
    # Another sampler or step count: bf exports its own cache again instead of asking the user to.
    r = run_bf("infer", "--prompt", PROMPT, "--steps", "4", "--scheduler", "ddim", "--out", tmp_path / "d.png", "--json", cache=env_cache)
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["settings"]["steps"], json.loads(r.stdout)["settings"]["scheduler"]) == (4, "ddim")
    assert len(list(env_cache.iterdir())) == 2


def _gpu_model_and_ort_reference(exported_std, native_build, monkeypatch):
    """The export the GPU tests run, their request, and ONNX Runtime's image for it (fp32, CPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bf.runtime.backend_ort import OrtBackend
    from bf.runtime.exported import ExportedModel
    from bf.runtime.generation import GenerationRequest, generate

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    model = ExportedModel.open(exported_std / "onnx")
    req = GenerationRequest(PROMPT, seed=5)
    return model, req, generate(model, OrtBackend(model), req)


@pytest.mark.gpu
def test_torch_backend_on_the_gpu_matches_ort(exported_std, native_build, monkeypatch):
    """PyTorch fp16 on the GPU, weights decoded by the CUDA kernels, against ONNX Runtime fp32 on the CPU."""
    model, req, ref = _gpu_model_and_ort_reference(exported_std, native_build, monkeypatch)
    from bf.runtime.backend_torch import TorchBackend
    from bf.runtime.generation import generate

    # the default (weights streamed layer by layer, channels-last, CUDA graph), and weights decoded once at load, eager, NCHW
    # and the step compiled (torch.compile), its weights decoded inside it, or with every layer the fused kernels run
    # reading its codes (chosen at the first step)
    configs = ({}, {"weights": "decoded", "cuda_graph": False, "channels_last": False}, {"compile": True}, {"compile": True, "fused": "on"})
    for options in configs:
        torch._dynamo.reset()
        backend = TorchBackend(model, **options)
        assert backend.decoded_layers > 100
        ours = generate(model, backend, req)
        assert psnr_db(ours.images.astype(np.float32) / 255, ref.images.astype(np.float32) / 255) >= 35, options
        assert (backend.fused_layers > 0) == ("fused" in options), (options, backend.fused_layers)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compiled_with_fused_layers_the_smallest_others_stay_decoded_and_the_image_matches_ort(exported_std, native_build, monkeypatch):
    """--compile --fused on --keep-decoded 1: the layers the fused kernels cannot take (conv_in's 4 input channels) are
    the smallest others, kept decoded within the MB, and the image is ONNX Runtime's."""
    model, req, ref = _gpu_model_and_ort_reference(exported_std, native_build, monkeypatch)
    from bf.runtime.backend_torch import TorchBackend
    from bf.runtime.generation import generate

    torch._dynamo.reset()
    backend = TorchBackend(model, compile=True, fused="on", keep_decoded_bytes=2**20)
    ours = generate(model, backend, req)
    assert psnr_db(ours.images.astype(np.float32) / 255, ref.images.astype(np.float32) / 255) >= 35
    assert backend.fused_layers > 0 and 0 < backend.torch_unet.kept_decoded_bytes <= 2**20
    torch._dynamo.reset()


@pytest.mark.gpu
def test_low_memory_keeps_text_encoders_and_vae_off_the_gpu_between_calls(exported_std, native_build, monkeypatch):
    """TorchBackend(low_memory=True): the same image as ONNX Runtime (the VAE's tiles are larger than this image); the
    text encoders and the VAE are back on the CPU after a generation, and nothing but the UNet stays on the GPU."""
    import gc

    model, req, ref = _gpu_model_and_ort_reference(exported_std, native_build, monkeypatch)
    from bf.runtime.backend_torch import TorchBackend
    from bf.runtime.generation import generate

    held = {}
    for options in ({}, {"compile": True}):
        for low in (False, True):
            torch._dynamo.reset()  # a compiled earlier backend's model is not held by dynamo's caches
            gc.collect()
            torch.cuda.empty_cache()
            backend = TorchBackend(model, low_memory=low, **options)
            assert (backend._torch_unet is None) == low
            ours = generate(model, backend, req)
            assert psnr_db(ours.images.astype(np.float32) / 255, ref.images.astype(np.float32) / 255) >= 35, options
            held[low] = torch.cuda.memory_allocated()
            if low:
                assert {p.device.type for m in (backend.text, backend.vae) for p in m.parameters()} == {"cpu"}
                assert backend.torch_unet.step.graphs == {}  # let go when the VAE came
                assert backend.memory()["text_vae_bytes"] == 0 and backend.memory()["text_vae_visiting_bytes"] > 0
                # after a generation only the UNet stays: less than without, by at least the text encoder and VAE
                assert held[True] <= held[False] - backend.memory()["text_vae_visiting_bytes"], (options, held)
                again = generate(model, backend, req)  # the UNet's graph captured again after the VAE let it go
                assert np.array_equal(again.images, ours.images)
            del backend


def test_torch_backend_refuses_fused_kernels_without_streamed_weights(exported_std):
    from bf.errors import BfError
    from bf.runtime.backend_torch import TorchBackend
    from bf.runtime.exported import ExportedModel

    model = ExportedModel.open(exported_std / "onnx")
    with pytest.raises(BfError, match="fused='on' runs on streamed weights, not weights='decoded'"):
        TorchBackend(model, device="cpu", weights="decoded", fused="on")


def test_progress_shows_in_logs_when_stderr_is_not_a_terminal(exported_std, tmp_path):
    import os

    env = {**os.environ, "BF_PROGRESS_SECONDS": "0", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "bf.cli", "infer", str(exported_std / "onnx"), "--prompt", PROMPT, "--out",
                        str(tmp_path / "p.png")], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sampling: ")]
    assert len(lines) == 12 and lines[0].startswith("sampling: 1/11 UNet calls") and "done in" in lines[-1], r.stderr
