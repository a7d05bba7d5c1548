"""SDXL model directories: the architecture, random models, loading, and the layer accounting of a quantized SDXL UNet."""

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from bf.errors import BfError  # noqa: E402
from bf.models.directory import ModelDir  # noqa: E402


def test_sdxl_architecture_is_exact():
    """SDXL base 1.0's parameter counts: UNet 2567.46M, CLIP ViT-L text 123.06M, OpenCLIP ViT-bigG text with its
    projection 694.66M, VAE 83.65M."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bf.models.architectures import ARCHITECTURES

    a = ARCHITECTURES["sdxl"]
    with torch.device("meta"):
        modules = (UNet2DConditionModel(**a.unet), CLIPTextModel(CLIPTextConfig(**a.text_encoder)),
                   CLIPTextModelWithProjection(CLIPTextConfig(**a.text_encoder_2)), AutoencoderKL(**a.vae))  # fmt: skip
    counts = [sum(p.numel() for p in m.parameters()) for m in modules]
    assert counts == [2_567_463_684, 123_060_480, 694_659_840, 83_653_863]
    unet = modules[0]
    assert unet.config.cross_attention_dim == a.text_encoder["hidden_size"] + a.text_encoder_2["hidden_size"]
    assert unet.config.projection_class_embeddings_input_dim == a.text_encoder_2["projection_dim"] + 6 * unet.config.addition_time_embed_dim


def test_sdxl_tiny_keeps_the_block_types(tiny_sdxl_model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_model, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407  # "!" and the end token, as SDXL's
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time" and cfg.use_linear_projection
    assert list(cfg.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert max(cfg.transformer_layers_per_block) > 1
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_sdxl_directory_is_recognised_and_checked(tiny_sdxl_model, tiny_model, tmp_path):
    from bf.models.diffusers_pipeline import load_model

    model = ModelDir.open(tiny_sdxl_model)
    assert model.family == "sdxl" and ModelDir.open(tiny_model).family == "sd15"
    assert model.base_components() == ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
    assert type(load_model(tiny_sdxl_model, scheduler="euler").pipe).__name__ == "StableDiffusionXLPipeline"
    # the hash covers the second text encoder: changing it changes the hash
    broken = tmp_path / "m"
    shutil.copytree(tiny_sdxl_model, broken)
    before = ModelDir.open(broken).content_hash()
    cfg = broken / "text_encoder_2" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert ModelDir.open(broken).content_hash() != before
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(BfError, match=r"Stable Diffusion XL directory: missing text_encoder_2/; copy the whole model"):
        ModelDir.open(broken)
    shutil.rmtree(broken / "tokenizer_2")
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))  # only the UNet says SDXL
    with pytest.raises(BfError, match=r"missing text_encoder_2/, tokenizer_2/; "):
        ModelDir.open(broken)
    refiner = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True, "text_encoder": [None, None],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}  # fmt: skip
    (broken / "model_index.json").write_text(json.dumps(refiner))
    with pytest.raises(BfError, match=r"is an SDXL refiner .*: pass the base model's directory$"):
        ModelDir.open(broken)


def test_quantized_sdxl_accounts_for_the_added_embedding(tiny_sdxl_model):
    """SDXL's ResBlock time projections and added embedding see the prompt: quantized like other layers; only the
    time-embedding MLP is kept (float32), and its width is one row of the time table."""
    from bf.format import candidate_layers, quantizable_layers
    from bf.format.summary import summarize
    from bf.trainer.quantize_model import QuantizeRequest, quantize_model

    shapes = {k: tuple(v.shape) for k, v in ModelDir.open(tiny_sdxl_model).read_weights("unet").items()}
    layers = quantizable_layers(shapes)
    assert "add_embedding.linear_1" in layers and "add_embedding.linear_2" in layers
    assert "down_blocks.0.resnets.0.time_emb_proj" in candidate_layers(shapes)
    assert not [m for m in layers if m.startswith("time_embedding.")]
    ckpt = quantize_model(ModelDir.open(tiny_sdxl_model), QuantizeRequest(bits=2))
    kept_weights = sorted(k for k, v in ckpt.tensors.items() if k.endswith(".weight") and v.ndim in (2, 4))
    assert kept_weights == ["time_embedding.linear_1.weight", "time_embedding.linear_2.weight"]
    assert ckpt.tensors["time_embedding.linear_1.weight"].dtype.name == "float32"
    s = summarize(ckpt)
    width = shapes["time_embedding.linear_2.weight"][0]
    assert s["time_table_bytes"] == 2 * 50 * width
    assert s["time_layers_bytes"] == 4 * sum(v.size for k, v in ckpt.tensors.items() if k.startswith("time_embedding."))


def test_a_directory_of_fp16_variant_files_loads(tiny_sdxl_model, tmp_path):
    """Many SDXL downloads hold only the .fp16 files: the pipeline and the trainer's text encoders load them."""
    from bf.models.diffusers_pipeline import load_model, text_parts

    d = tmp_path / "fp16"
    shutil.copytree(tiny_sdxl_model, d)
    for f in [*d.glob("*/model.safetensors"), *d.glob("*/diffusion_pytorch_model.safetensors")]:
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    model = ModelDir.open(d)
    assert model.variant("unet") == {"variant": "fp16"} and ModelDir.open(tiny_sdxl_model).variant("unet") == {}
    pipe = load_model(d).pipe
    ref = load_model(tiny_sdxl_model).pipe
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values(), strict=True))
    assert "text_encoder_2" in text_parts(model)
