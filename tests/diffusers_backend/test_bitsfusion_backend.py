"""bf.diffusers: a .bfq as a diffusers model directory (bf to-diffusers) that diffusers' own from_pretrained loads
through the registered bitsfusion backend: packed codes kept, outputs equal to the dequantized UNet, round trips."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from conftest import random_lora_file  # noqa: E402


def _dequantized_unet():
    from diffusers import UNet2DConditionModel

    from bf.format import Checkpoint
    from bf.models.shipped import shipped_bfq

    ckpt = Checkpoint.load(shipped_bfq())
    unet = UNet2DConditionModel.from_config(ckpt.unet_config).eval()
    unet.load_state_dict({k: torch.from_numpy(np.asarray(v)).float() for k, v in ckpt.unet_state_dict().items()}, strict=True)
    return ckpt, unet


def test_the_directory_holds_packed_codes_and_the_config(diffusers_dir):
    from safetensors.numpy import load_file

    ckpt, _ = _dequantized_unet()
    cfg = json.loads((diffusers_dir / "unet" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsfusion" and set(cfg["layers"]) == set(ckpt.layers)
    name, layer = next(iter(sorted(ckpt.layers.items())))
    assert cfg["layers"][name] == {"shape": list(layer.shape), "bits": layer.grid.bits, "grid": layer.grid.kind}
    stored = load_file(str(diffusers_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any(f"{n}.weight" in stored for n in ckpt.layers)  # no dequantized copy
    for n, ly in ckpt.layers.items():
        assert np.array_equal(stored[f"{n}.codes"], ly.codes) and np.array_equal(stored[f"{n}.scale"], ly.scale)
    assert (diffusers_dir / "text_encoder").is_dir() and (diffusers_dir / "model_index.json").is_file()


def test_from_pretrained_gives_the_dequantized_unets_outputs_and_round_trips(diffusers_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from bf.diffusers import LowBitLayer  # importing bf.diffusers registers the backend

    ckpt, ref = _dequantized_unet()
    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    low = {n: m for n, m in unet.named_modules() if isinstance(m, LowBitLayer)}
    assert set(low) == set(ckpt.layers)
    assert all(m.scale.dtype == torch.float32 and m.codes.dtype == torch.uint8 for m in low.values())
    assert all(torch.equal(m.codes, torch.from_numpy(ckpt.layers[n].codes)) for n, m in low.items())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, ref.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ours = unet(x, torch.tensor(500), ctx).sample
        assert torch.equal(ours, ref(x, torch.tensor(500), ctx).sample)  # the CPU decode is the format's exact rule
        unet.save_pretrained(tmp_path / "again")
        again = UNet2DConditionModel.from_pretrained(tmp_path / "again")
        assert torch.equal(again(x, torch.tensor(500), ctx).sample, ours)
    assert all(isinstance(again.get_submodule(n), LowBitLayer) for n in ckpt.layers)
    from bf.errors import BfError

    with pytest.raises(BfError, match=r"fuse_qkv_projections: the attention projections are 1\.99-bit layers"):
        again.fuse_qkv_projections()
    # layerwise casting (float8 storage) leaves the low-bit layers' float32 scales alone and still runs
    again.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert all(again.get_submodule(n).scale.dtype == torch.float32 for n in ckpt.layers)
    assert again.conv_norm_out.weight.dtype == torch.float32 and again.time_embedding.linear_1.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert (again(x, torch.tensor(500), ctx).sample - ours).abs().max() < 0.5


def test_a_diffusers_pipeline_runs_it_like_the_dequantized_model(diffusers_dir):
    from diffusers import DiffusionPipeline

    import bf.diffusers  # noqa: F401

    _, ref = _dequantized_unet()
    pipe = DiffusionPipeline.from_pretrained(diffusers_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def images(p):
        return p("a red circle on the left", num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="np").images

    ours = images(pipe)
    pipe.unet = ref
    assert ours.shape == (1, 128, 128, 3) and np.array_equal(ours, images(pipe))


def test_bad_configs_and_outputs_get_one_line(diffusers_dir, tmp_path):
    from conftest import run_bf
    from diffusers import UNet2DConditionModel

    from bf.diffusers import BitsFusionConfig
    from bf.errors import BfError

    with pytest.raises(BfError, match="has no colour; is the model from a newer bf"):
        BitsFusionConfig({}, colour=1)
    with pytest.raises(BfError, match="layer conv_in is not"):
        BitsFusionConfig({"conv_in": {"shape": [4], "bits": 0, "grid": "balanced"}})
    import shutil

    shutil.copytree(diffusers_dir, tmp_path / "m")
    cfg_path = tmp_path / "m" / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    shape = cfg["quantization_config"]["layers"]["conv_in"]["shape"]
    cfg["quantization_config"]["layers"]["conv_in"]["shape"] = [1, 2, 3, 3]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BfError, match=r"bitsfusion layer conv_in holds a \(1, 2, 3, 3\) weight, the model's is"):
        UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet")
    r = run_bf("to-diffusers", "--out", tmp_path / "m")
    assert r.returncode == 1 and "already exists; give a new directory" in r.stderr
    from safetensors.numpy import load_file, save_file

    cfg["quantization_config"]["layers"]["conv_in"]["shape"] = shape  # the right config, but the file lacks the layer
    cfg_path.write_text(json.dumps(cfg))
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("conv_in.")}, str(weights))
    with pytest.raises(BfError, match=r"no packed codes and scales for 1 bitsfusion layer\(s\), e.g. conv_in.codes"):
        UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet")


def test_the_pipeline_matches_bf_infer_and_takes_diffusers_own_options(diffusers_dir, tmp_path):
    """From the same initial latents, the diffusers pipeline's image equals bf infer's on the shipped 1.99-bit model
    (ONNX Runtime, CPU) at >= 35 dB; diffusers' schedulers, step callbacks, torch.Generator seeds and
    num_images_per_prompt work on it."""
    from conftest import run_bf
    from diffusers import DDIMScheduler, DiffusionPipeline
    from PIL import Image

    import bf.diffusers  # noqa: F401
    from bf.runtime.generation import initial_latents

    prompt = "a red circle above a blue square"
    r = run_bf("infer", "--prompt", prompt, "--steps", "4", "--seed", "7", "--out", tmp_path / "bf.png", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    pipe = DiffusionPipeline.from_pretrained(diffusers_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(initial_latents(7, (1, 4, 16, 16), pipe.scheduler.init_noise_sigma))
    ours = pipe(prompt, num_inference_steps=4, guidance_scale=7.5, latents=latents, output_type="np").images[0]
    theirs = np.asarray(Image.open(tmp_path / "bf.png")).astype(np.float32) / 255
    mse = float(((np.round(ours * 255) / 255 - theirs) ** 2).mean())
    assert mse == 0 or 10 * np.log10(1 / mse) >= 35
    steps = []
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def on_step(p, i, t, kwargs):
        steps.append(int(t))
        return kwargs

    out = pipe(prompt, num_inference_steps=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
               callback_on_step_end=on_step, output_type="np").images  # fmt: skip
    again = pipe(prompt, num_inference_steps=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), output_type="np")
    assert out.shape == (2, 128, 128, 3) and len(steps) == 3 and np.array_equal(out, again.images)
    assert not np.array_equal(out[0], out[1])


def test_a_lora_runs_beside_the_low_bit_layers(diffusers_dir, tmp_path):
    """A LoRA (peft, diffusers' format; attention projections and ResNet convolutions) loaded with load_lora_weights runs
    as a branch beside the low-bit layers: the images equal the dequantized model's with the same LoRA, for one
    adapter, at a weight of 0.5, and for two at once; unload_lora_weights restores the base; fuse_lora is refused in
    one line and changes nothing."""
    pytest.importorskip("peft")
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from bf.diffusers import LowBitLinear
    from bf.errors import BfError

    _, ref = _dequantized_unet()
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        ref.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False), name)
        StableDiffusionPipeline.save_lora_weights(tmp_path / name, unet_lora_layers=get_peft_model_state_dict(ref, adapter_name=name))
        ref.delete_adapters(name)
    pipes = [DiffusionPipeline.from_pretrained(diffusers_dir, dtype=torch.float32) for _ in range(2)]
    pipes[1].unet = ref
    for p in pipes:
        p.set_progress_bar_config(disable=True)

    def images(p):
        return p("a red circle on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np").images

    base = images(pipes[0])
    for p in pipes:
        p.load_lora_weights(tmp_path / "a", adapter_name="a")
    ours = images(pipes[0])
    assert not np.array_equal(ours, base) and np.array_equal(ours, images(pipes[1]))
    q = pipes[0].unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(q.get_base_layer(), LowBitLinear)  # the base stays packed codes
    for p in pipes:
        p.load_lora_weights(tmp_path / "b", adapter_name="b")
        p.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    assert np.array_equal(images(pipes[0]), images(pipes[1]))
    with pytest.raises(BfError, match=r"is a 1\.99-bit layer \(packed codes\) that a LoRA cannot be fused into"):
        pipes[0].fuse_lora()
    with pytest.raises(BfError, match=r"save_pretrained: a LoRA is loaded beside the 1\.99-bit layer .*unload_lora_weights"):
        pipes[0].unet.save_pretrained(tmp_path / "saved")
    with pytest.raises(BfError, match=r"save_pretrained: a LoRA is loaded beside the 1\.99-bit layer"):
        pipes[0].save_pretrained(tmp_path / "saved")  # the whole pipeline: refused before its first component is written
    assert not (tmp_path / "saved").exists()
    pipes[0].unload_lora_weights()
    assert np.array_equal(images(pipes[0]), base)
    pipes[0].unet.save_pretrained(tmp_path / "saved")  # without the LoRA: the packed layout


def test_bf_export_lora_puts_the_branch_into_the_graph(diffusers_dir, tmp_path, native_build, monkeypatch):
    """bf export --lora FILE:SCALE: the exported model run by bf infer (ONNX Runtime) equals the diffusers pipeline with the
    same LoRA at the same scale (>= 35 dB), and differs from the model without it; bad LoRAs get one line."""
    pytest.importorskip("peft")
    from conftest import run_bf
    from diffusers import DiffusionPipeline
    from PIL import Image

    import bf.diffusers  # noqa: F401
    from bf.runtime.generation import initial_latents

    _, ref = _dequantized_unet()
    lora = random_lora_file(tmp_path / "style.safetensors", ref)
    prompt = "a red circle above a blue square"
    r = run_bf("export", "shipped-1.99bit", "--target", "onnx-std", "--steps", "3", "--lora", f"{lora}:0.8", "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr
    assert "at scale 0.8: a branch beside" in r.stderr
    r = run_bf("infer", tmp_path / "e", "--prompt", prompt, "--steps", "3", "--seed", "7", "--out", tmp_path / "l.png")
    assert r.returncode == 0, r.stderr
    pipe = DiffusionPipeline.from_pretrained(diffusers_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(initial_latents(7, (1, 4, 16, 16), pipe.scheduler.init_noise_sigma))

    def image():
        return pipe(prompt, num_inference_steps=3, guidance_scale=7.5, latents=latents.clone(), output_type="np").images[0]

    plain = image()
    pipe.load_lora_weights(lora, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    with_lora = image()
    ours = np.asarray(Image.open(tmp_path / "l.png")).astype(np.float32) / 255
    mse = float(((np.round(with_lora * 255) / 255 - ours) ** 2).mean())
    assert mse == 0 or 10 * np.log10(1 / mse) >= 35
    assert np.abs(np.round(plain * 255) / 255 - ours).max() > 0.1
    from bf.errors import BfError
    from bf.runtime.backend_torch import TorchBackend
    from bf.runtime.exported import ExportedModel
    from bf.runtime.generation import GenerationRequest, generate

    # the torch backend runs the source model and adds the export's LoRA itself (eager here: inductor is the GPU tests')
    monkeypatch.setenv("BF_DECODE_LIB", str(native_build / "libbf_decode.so"))
    exported = ExportedModel.open(tmp_path / "e")
    backend = TorchBackend(exported, device="cpu", dtype="float32", compile=True, cuda_graph=False, channels_last=False)
    assert [(a["file"], a["scale"]) for a in backend.lora_applied] == [(str(lora), 0.8)] and backend.lora_applied[0]["layers"] > 8
    backend.torch_unet.step = backend.torch_unet.eager_step
    torch_image = generate(exported, backend, GenerationRequest(prompt, steps=3, seed=7)).images[0].astype(np.float32) / 255
    mse = float(((torch_image - ours) ** 2).mean())
    assert mse == 0 or 10 * np.log10(1 / mse) >= 35
    lora.rename(tmp_path / "moved.safetensors")
    with pytest.raises(BfError, match=r"exported with the LoRA .*style\.safetensors, which is gone"):
        TorchBackend(exported, device="cpu")
    (tmp_path / "moved.safetensors").rename(lora)
    original = lora.read_bytes()
    lora.write_bytes(original + b" ")
    with pytest.raises(BfError, match=r"exported with the LoRA .*style\.safetensors, which has changed since"):
        TorchBackend(exported, device="cpu")
    lora.write_bytes(original)
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["loras"][0]["file"] == str(lora.resolve())

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora))
    save_file({k.replace("down_blocks", "middle_blocks"): v for k, v in tensors.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BfError, match="matches no layer of this UNet"):  # low memory builds the UNet later: checked at once
        TorchBackend(exported, device="cpu", low_memory=True, loras=[(tmp_path / "other.safetensors", 1.0)])
    key = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
    save_file({**tensors, key: tensors[key][:, :-1].contiguous()}, str(tmp_path / "rank.safetensors"))
    for arg, message in ((f"{lora}:x", "style.safetensors:x: the scale after the last ':' must be a number"),
                         (str(tmp_path / "none.safetensors"), "no such file"),
                         (str(tmp_path / "other.safetensors"), "matches no layer of this UNet"),
                         (str(tmp_path / "rank.safetensors"), "features, the layer")):  # fmt: skip
        r = run_bf("export", "shipped-1.99bit", "--target", "onnx-std", "--steps", "3", "--lora", arg, "--out", tmp_path / "bad")
        assert r.returncode == 1 and message in r.stderr.strip().splitlines()[-1], (arg, r.stderr[-400:])
        assert not (tmp_path / "bad").exists()


def test_lora_files_are_read_with_their_alphas_and_refused_where_the_export_cannot_place_them(tmp_path):
    """read_lora: alpha / rank from the adapter metadata diffusers stores (lora_alpha 8, rank 4: 2.0), rsLoRA's
    alpha / sqrt(rank); a time-embedding adapter (the export computes those into a table) and keys that are no
    down/up weight are refused by name; FILE:SCALE parsing."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from bf.cli.checks import parse_lora_arg
    from bf.errors import BfError
    from bf.lora_adapters import LoRAHooks, read_lora

    _, ref = _dequantized_unet()
    for rslora, ratio in ((False, 2.0), (True, 8 / 4**0.5)):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], use_rslora=rslora)
        ref.add_adapter(config, "m")
        out = tmp_path / f"meta{rslora}"
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(ref, adapter_name="m"),
                                                  unet_lora_adapter_metadata=config.to_dict())  # fmt: skip
        ref.delete_adapters("m")
        weights, ratios = read_lora(out / "pytorch_lora_weights.safetensors")
        assert weights and all(r == pytest.approx(ratio) for r in ratios.values())
    _, ref = _dequantized_unet()  # without peft's wrappers
    plain = random_lora_file(tmp_path / "plain.safetensors", ref, targets=("to_q", "time_emb_proj"))
    with pytest.raises(BfError, match="time_emb_proj is a time-embedding layer"):  # SD-v1.5's are in the time table
        LoRAHooks(ref, [(plain, 1.0)])
    with pytest.raises(BfError, match=r"time_embedding\.linear_1 is a time-embedding layer"):  # in every model's table
        read_lora(random_lora_file(tmp_path / "t.safetensors", ref, targets=("to_q", "linear_1")))
    tensors = load_file(str(random_lora_file(tmp_path / "q.safetensors", ref, targets=("to_q",))))
    key = next(iter(tensors))
    save_file({**tensors, key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(3)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(BfError, match="is no LoRA down or up weight"):
        read_lora(tmp_path / "dora.safetensors")
    assert parse_lora_arg("a.safetensors:0.5") == (Path("a.safetensors"), 0.5)
    assert parse_lora_arg("C:/x/a.safetensors") == (Path("C:/x/a.safetensors"), 1.0)
    with pytest.raises(BfError, match="finite"):
        parse_lora_arg("a.safetensors:nan")
    with pytest.raises(BfError, match=r"the scale after the last ':' must be a number, as in .*plain\.safetensors:0\.8"):
        parse_lora_arg(f"{plain}:abc")


def test_a_lora_that_does_not_fit_the_low_bit_unet_gets_one_line(diffusers_dir, tmp_path):
    """load_lora_adapter / load_lora_weights on a bitsfusion UNet: a LoRA for another architecture, a shape or a rank
    that does not fit, and a file with no UNet adapters are refused in one line before anything is injected."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from bf.errors import BfError

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    good = load_file(str(random_lora_file(tmp_path / "ok.safetensors", unet)))
    key = next(k for k in good if k.endswith("to_q.lora_A.weight"))
    up = key.replace("lora_A", "lora_B")
    bad = {
        "other": ({k.replace("down_blocks", "middle_blocks"): v for k, v in good.items()}, "matches no layer of this UNet2DConditionModel"),
        "shape": ({**good, key: good[key][:, :-1].contiguous()}, "maps 47 to 48 features, the layer 48 to 48"),
        "rank": ({**good, up: good[up][:, :-1].contiguous()}, "down weight has rank 4, its up weight 3"),
        "half": ({k.replace("lora_A", "lora_C"): v for k, v in good.items()}, "has a down or an up weight but not both"),
        "none": ({k.replace(".weight", ".scale"): v for k, v in good.items()}, "no LoRA weights for this model in it"),
    }
    for name, (tensors, message) in bad.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(BfError, match=message):
            unet.load_lora_adapter(str(tmp_path / f"{name}.safetensors"), prefix="unet", adapter_name=name)
        assert not any("lora" in n for n, _ in unet.named_parameters()), name  # nothing injected
    unet.load_lora_adapter(str(tmp_path / "ok.safetensors"), prefix="unet", adapter_name="ok")
    assert any("lora_A" in n for n, _ in unet.named_parameters())
