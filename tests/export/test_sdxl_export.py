"""SDXL through export and the runtime: both text encoders, the UNet's added conditioning, every lowering, and
images equal to diffusers' StableDiffusionXLPipeline on the same quantized model."""

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from conftest import run_bf  # noqa: E402

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def sdxl_bfq(tiny_sdxl_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    r = run_bf("quantize", "--model", tiny_sdxl_model, "--bits", "2", "--out", tmp / "xl.bfq")
    assert r.returncode == 0, r.stderr
    return tmp / "xl.bfq"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _diffusers_image(bfq, prompt, negative=None, steps=4, seed=7, **micro):
    """The quantized model (dequantized) in StableDiffusionXLPipeline, Euler, from the runtime's initial noise;
    ``micro``: original_size, crops_coords_top_left."""
    from bf.models.diffusers_pipeline import load_model
    from bf.runtime.generation import initial_latents

    pipe = load_model(bfq).pipe
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    noise = torch.from_numpy(initial_latents(seed, (1, 4, 8, 8), 1.0))  # the pipeline scales it by init_noise_sigma
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=7.5, latents=noise, output_type="np", **micro)
    return np.round(out.images[0] * 255) / 255


@pytest.mark.parametrize("target", ["onnx-std", "onnx", "onnx-qdq"])
def test_sdxl_exports_in_every_lowering_and_matches_diffusers(sdxl_bfq, target, tmp_path, ort_op_library, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("BF_ORT_OP_LIB", str(ort_op_library))
    out = tmp_path / "e"
    r = run_bf("export", sdxl_bfq, "--target", target, "--steps", "4", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert (m["family"], m["scheduler"]["name"], m["pooled_size"], m["hidden_size"]) == ("sdxl", "euler", 32, 64)
    assert m["vae_upcast"] and m["force_zeros_for_empty_prompt"]
    assert set(m["graphs"]) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    assert [i["name"] for i in m["graphs"]["unet"]["inputs"]] == ["sample", "step", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert [o["name"] for o in m["graphs"]["text_encoder_2"]["outputs"]] == ["hidden_states", "text_embeds"]
    assert all(c["psnr_db"] >= 40 for c in m["check"]) and len(m["check"]) == 4  # every graph, both outputs of the second encoder
    assert m["graphs"]["unet"]["size_breakdown"]["time_table"] >= 4 * 128 * 2  # (steps, time embedding width), the only table
    assert (out / "tokenizer_2").is_dir()
    if target == "onnx-qdq":  # the float16 copy engines are built from keeps the micro-conditioning's embedding float32
        import onnx
        import onnxruntime as ort

        from bf.export.check import psnr_db
        from bf.export.fp16_graph import _float32_island, to_fp16

        unet = onnx.load(out / "unet.onnx")
        kept = _float32_island(unet.graph)[0]
        island = {n.op_type for n in unet.graph.node if n.name in kept}
        assert {"Sin", "Cos", "Concat"} <= island
        rng = np.random.default_rng(0)
        feed = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "step": np.array([1]),
                "encoder_hidden_states": rng.standard_normal((2, 77, 64)).astype(np.float32),
                "text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
                "time_ids": np.array([[1216, 832, 0, 0, 1216, 832]] * 2, np.float32)}  # fmt: skip
        run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
        assert psnr_db(run(to_fp16(unet)), run(unet)) >= 40
    r = run_bf("infer", out, "--prompt", PROMPT, "--steps", "4", "--seed", "7", "--out", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(tmp_path / "a.png")).astype(np.float32) / 255
    assert _psnr(ours, _diffusers_image(sdxl_bfq, PROMPT)) >= 35
    assert np.abs(ours - _diffusers_image(sdxl_bfq, "a green triangle")).max() > 0.02  # the prompt reaches the image
    if target == "onnx-std":  # a negative prompt is encoded (not zeros), as diffusers does for a given one
        args = ["--prompt", PROMPT, "--negative-prompt", "blurry", "--steps", "4", "--seed", "7", "--out", tmp_path / "n.png"]
        r = run_bf("infer", out, *args)
        assert r.returncode == 0, r.stderr
        neg = np.asarray(Image.open(tmp_path / "n.png")).astype(np.float32) / 255
        assert _psnr(neg, _diffusers_image(sdxl_bfq, PROMPT, negative="blurry")) >= 35
        assert np.abs(neg - ours).max() > 0.02
        # the micro-conditioning: told the image was 32x48 and cut at (8, 0), as diffusers' original_size and crops
        args = ["--prompt", PROMPT, "--original-size", "32x48", "--crop", "8,0", "--steps", "4", "--seed", "7", "--out", tmp_path / "m.png"]
        r = run_bf("infer", out, *args)
        assert r.returncode == 0, r.stderr
        micro = np.asarray(Image.open(tmp_path / "m.png")).astype(np.float32) / 255
        assert _psnr(micro, _diffusers_image(sdxl_bfq, PROMPT, original_size=(32, 48), crops_coords_top_left=(8, 0))) >= 35
        assert np.abs(micro - ours).max() > 0.02


def _onnx_std_export_and_ort_image(sdxl_bfq, tmp_path, native_build, monkeypatch):
    """The torch-backend tests' export (onnx-std, 4 steps), their request, and ONNX Runtime's image for it in [0, 1]."""
    from bf.runtime.backend_ort import OrtBackend
    from bf.runtime.exported import ExportedModel
    from bf.runtime.generation import GenerationRequest, generate

    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    r = run_bf("export", sdxl_bfq, "--target", "onnx-std", "--steps", "4", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    exported = ExportedModel.open(tmp_path / "e")
    req = GenerationRequest(PROMPT, steps=4, seed=7)
    return exported, req, generate(exported, OrtBackend(exported), req).images[0].astype(np.float32) / 255


def test_sdxl_torch_backend_matches_the_onnx_export(sdxl_bfq, tmp_path, native_build, monkeypatch):
    """The torch backend runs the .bfq's packed layers with the added conditioning packed after the hidden states;
    the same image as ONNX Runtime on the export. Low memory changes only the VAE's seams (and on a GPU, an upcast VAE's precision)."""
    from bf.errors import BfError
    from bf.runtime.backend_torch import TorchBackend
    from bf.runtime.generation import GenerationRequest, generate

    exported, req, ort = _onnx_std_export_and_ort_image(sdxl_bfq, tmp_path, native_build, monkeypatch)
    # the compiled step's weights decode on the CPU too (eager here: inductor is the GPU tests')
    backend = TorchBackend(exported, device="cpu", dtype="float32", compile=True, cuda_graph=False, channels_last=False)
    backend.torch_unet.step = backend.torch_unet.eager_step
    assert backend.text_2 is not None and backend.vae_dtype == torch.float32
    image = generate(exported, backend, req).images[0].astype(np.float32) / 255
    assert _psnr(image, ort) >= 35
    assert np.abs(image - generate(exported, backend, GenerationRequest("a green triangle", steps=4, seed=7)).images[0] / 255).max() > 0.02
    # low memory: the UNet built at its first step, the VAE in tiles (64 pixels here, overlapping, of a 128x128 image)
    low = TorchBackend(exported, device="cpu", dtype="float32", compile=True, cuda_graph=False, channels_last=False, low_memory=True,
                       vae_tile_px=64)  # fmt: skip
    assert low._torch_unet is None
    encoded = low.text_encoder_2(np.zeros((2, 77), dtype=np.int64))
    assert low._torch_unet is None and len(encoded) == 2
    with torch.inference_mode():  # built as a generation builds it, inside the UNet's call
        low.torch_unet.step = low.torch_unet.eager_step
    assert not any(t.is_inference() for t in low.unet_module.parameters())
    big = GenerationRequest(PROMPT, steps=4, seed=7, height=128, width=128)
    whole, tiled = (generate(exported, b, big).images[0].astype(np.float32) / 255 for b in (backend, low))
    assert 25 <= _psnr(tiled, whole) < 80  # the seams' blending changes pixels, not the picture
    low.vae.vae.disable_tiling()
    assert np.array_equal(generate(exported, low, big).images[0].astype(np.float32) / 255, whole)  # all else as without it
    with pytest.raises(BfError, match="vae_tile_px=100: must be a multiple of 64"):
        TorchBackend(exported, device="cpu", low_memory=True, vae_tile_px=100)
    # low memory on a GPU with bfloat16 decodes an upcast VAE (SDXL's) in bfloat16: the tiled image within a few 8-bit levels of float32's
    latent = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32))
    with torch.inference_mode():
        f32 = low.vae(latent).numpy()
        b16 = copy.deepcopy(low.vae).to(torch.bfloat16)(latent.to(torch.bfloat16)).float().numpy()
    assert _psnr(b16, f32) >= 45 and 0 < np.abs(b16 - f32).max() < 12 / 255  # measured: 51.5 dB, at most 6.1 levels


@pytest.mark.gpu
def test_sdxl_low_memory_on_the_gpu_decodes_in_bfloat16_and_matches_the_onnx_export(sdxl_bfq, tmp_path, native_build, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bf.runtime.backend_torch import TorchBackend
    from bf.runtime.generation import generate

    exported, req, ort = _onnx_std_export_and_ort_image(sdxl_bfq, tmp_path, native_build, monkeypatch)
    backend = TorchBackend(exported, low_memory=True)
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    assert backend.vae_dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert {p.dtype for p in backend.vae.parameters()} == {backend.vae_dtype}
    image = generate(exported, backend, req).images[0].astype(np.float32) / 255
    assert _psnr(image, ort) >= 30  # fp16 UNet, bfloat16 VAE, against float32 throughout


def test_an_upcast_vae_runs_in_bfloat16_only_in_low_memory_on_a_gpu_that_has_it(monkeypatch):
    from bf.runtime.backend_torch import vae_run_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert vae_run_dtype(torch, torch.float16, True, True, "cuda") == torch.bfloat16
    assert vae_run_dtype(torch, torch.float16, True, False, "cuda") == torch.float32  # as diffusers runs it
    assert vae_run_dtype(torch, torch.float32, True, True, "cpu") == torch.float32
    assert vae_run_dtype(torch, torch.float16, False, True, "cuda") == torch.float16  # SD-v1.5's VAE: the model's dtype
    assert vae_run_dtype(torch, torch.float32, True, True, "cuda") == torch.float32  # a float32 run stays float32
    # bfloat16 only where the GPU computes it (not emulated, as on GPUs before Ampere)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert vae_run_dtype(torch, torch.float16, True, True, "cuda") == torch.float32


def test_sdxl_and_sd15_parts_are_not_mixed(sdxl_bfq, tiny_model, tiny_sdxl_model, tmp_path):
    """An SDXL .bfq with an SD-v1.5-style base model, and an SD-v1.5 export whose manifest says SDXL: one line each."""
    r = run_bf("export", sdxl_bfq, "--base-model", tiny_model, "--target", "onnx-std", "--steps", "4", "--out", tmp_path / "e")
    assert r.returncode != 0 and "its UNet is an SDXL one" in r.stderr and "is an SD-v1.5-style model" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and not (tmp_path / "e").exists()
    assert "warning" not in r.stderr  # the family is checked before the hash: no warning that it differs first
    r = run_bf("quantize", "--model", tiny_model, "--bits", "2", "--out", tmp_path / "sd.bfq")
    assert r.returncode == 0, r.stderr
    r = run_bf("export", tmp_path / "sd.bfq", "--base-model", tiny_sdxl_model, "--target", "onnx-std", "--out", tmp_path / "e")
    assert r.returncode != 0 and "its UNet is an SD-v1.5-style one and" in r.stderr and "is an SDXL model" in r.stderr
    r = run_bf("export", tmp_path / "sd.bfq", "--target", "onnx-std", "--steps", "4", "--out", tmp_path / "sd")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "sd" / "manifest.json").read_text())
    assert manifest["family"] == "sd15"
    r = run_bf("infer", tmp_path / "sd", "--prompt", PROMPT, "--steps", "4", "--crop", "8,8", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "--original-size and --crop are SDXL's micro-conditioning" in r.stderr
    (tmp_path / "sd" / "manifest.json").write_text(json.dumps({**manifest, "family": "sdxl"}))
    r = run_bf("infer", tmp_path / "sd", "--prompt", PROMPT, "--steps", "4", "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "graphs.text_encoder_2 is missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sdxl_trt_rtx_engines_keep_the_vae_in_float32(sdxl_bfq, tmp_path):
    """Four engines built on this CPU for RTX GPUs; fp16 but for SDXL's VAE decoder, which overflows in float16."""
    pytest.importorskip("tensorrt_rtx")
    r = run_bf("export", sdxl_bfq, "--target", "trt-rtx", "--steps", "4", "--out", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    engines = json.loads((tmp_path / "r" / "manifest.json").read_text())["engines"]
    precisions = {name: e["precision"] for name, e in engines.items() if isinstance(e, dict)}
    assert precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    assert all((tmp_path / "r" / e["file"]).stat().st_size > 0 for e in engines.values() if isinstance(e, dict))


def test_sdxl_lora_on_the_time_projections_is_exported(sdxl_bfq, tmp_path):
    """SDXL's ResBlock time projections are ordinary layers (they see the prompt): a LoRA on them and on attention goes
    into the UNet graph, and the export run by bf infer equals StableDiffusionXLPipeline with the same LoRA."""
    pytest.importorskip("peft")
    from conftest import random_lora_file
    from PIL import Image

    from bf.models.diffusers_pipeline import load_model
    from bf.runtime.generation import initial_latents

    pipe = load_model(sdxl_bfq).pipe
    lora = random_lora_file(tmp_path / "l.safetensors", pipe.unet, targets=("to_q", "to_v", "conv1", "time_emb_proj"))
    r = run_bf("export", sdxl_bfq, "--target", "onnx-std", "--steps", "4", "--lora", f"{lora}:0.8", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    r = run_bf("infer", tmp_path / "e", "--prompt", PROMPT, "--steps", "4", "--seed", "7", "--out", tmp_path / "l.png")
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(tmp_path / "l.png")).astype(np.float32) / 255
    noise = torch.from_numpy(initial_latents(7, (1, 4, 8, 8), 1.0))

    def image():
        out = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=noise.clone(), output_type="np")
        return np.round(out.images[0] * 255) / 255

    plain = image()
    pipe.load_lora_weights(lora, adapter_name="l")
    pipe.set_adapters(["l"], adapter_weights=[0.8])
    assert _psnr(ours, image()) >= 35
    assert np.abs(ours - plain).max() > 0.05
