"""``bf random-model``: a randomly initialised model in diffusers layout.

For size and speed work without pretrained weights, and for tests. Needs torch,
diffusers and transformers (the ``bf[train]`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

from bf.atomic import atomic_dir
from bf.models.architectures import Architecture
from bf.models.tokenizer_files import write_tokenizer_dir

DTYPES = ("fp32", "fp16")

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_random_model(arch: Architecture, out: Path, seed: int, dtype: str = "fp32", overwrite: bool = False, log=print) -> None:
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]

    def save(module, where: Path) -> None:
        if torch_dtype != torch.float32:
            module.to(torch_dtype)
        module.save_pretrained(where, safe_serialization=True)

    version = {"_diffusers_version": diffusers.__version__}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        torch.manual_seed(seed)
        log(f"building UNet ({arch.name})")
        unet = UNet2DConditionModel(**arch.unet)
        save(unet, tmp / "unet")
        del unet
        log("building text encoder")
        text = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
        save(text, tmp / "text_encoder")
        del text
        if arch.text_encoder_2 is not None:
            log("building second text encoder (with projection)")
            text = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2))
            save(text, tmp / "text_encoder_2")
            del text
            write_tokenizer_dir(tmp / "tokenizer_2", pad_token="!")
        log("building VAE")
        vae = AutoencoderKL(**arch.vae)
        save(vae, tmp / "vae")
        del vae
        write_tokenizer_dir(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({**arch.scheduler, **version}, indent=2))
        index = SDXL_MODEL_INDEX if arch.family == "sdxl" else MODEL_INDEX
        (tmp / "model_index.json").write_text(json.dumps({**index, **version}, indent=2))
