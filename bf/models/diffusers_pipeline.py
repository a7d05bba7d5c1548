"""A diffusers text-to-image pipeline for a model directory or a .bfq (dequantized UNet)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bf.format import Checkpoint
from bf.models.base_model import check_same_family, resolve_base_model
from bf.models.directory import ModelDir
from bf.scheduler_names import KNOWN_SCHEDULER_CLASSES, SCHEDULERS, native_scheduler


@dataclass
class LoadedModel:
    pipe: object  # diffusers.StableDiffusionPipeline or StableDiffusionXLPipeline
    label: str
    source: Path
    scheduler: str = "pndm"  # the sampler's name (bf.scheduler_names)


def make_scheduler(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    if name == "pndm":
        return PNDMScheduler.from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpmpp2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}")


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from components, without safety checker or progress bar."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_model(
    source: Path, scheduler: str | None = None, device: str = "cpu", base_model: Path | None = None, log=lambda m: None,
    checkpoint: Checkpoint | None = None, before_weights=None,
) -> LoadedModel:  # fmt: skip
    """``scheduler``: a sampler name, or None for the model's own. ``checkpoint``: the .bfq at ``source``, when the
    caller has loaded it already. ``before_weights(base, unet_config)``: called with the base model's directory
    (bf.models.directory.ModelDir) and the UNet's config before any weight loads, to refuse what those tell."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = Path(source)
    ckpt = (checkpoint or Checkpoint.load(source)) if source.is_file() else None
    base = ModelDir(resolve_base_model(ckpt, source, base_model, log) if ckpt is not None else ModelDir.open(source).root)
    root = base.root
    unet_config = ckpt.unet_config if ckpt is not None else base.config("unet")
    check_same_family(unet_config, base, source)  # from the configs: before any weight loads
    if before_weights is not None:
        before_weights(base, unet_config)
    if ckpt is not None:
        unet = UNet2DConditionModel.from_config(ckpt.unet_config)
        unet.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.unet_state_dict().items()})
    else:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False,
                                                    **base.variant("unet"))  # fmt: skip
    if scheduler is None:
        config = base.config("scheduler")
        scheduler = native_scheduler(config)
        if config.get("_class_name") not in KNOWN_SCHEDULER_CLASSES:
            log(f"{root}: its sampler {config.get('_class_name')} is not one bf has; sampling with {scheduler} (--scheduler picks another)")
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False, **base.variant("vae"))
    texts, sampler = text_parts(base), make_scheduler(scheduler, base.config("scheduler"))
    if base.family == "sdxl":
        pipe = assemble_xl_pipeline(base, vae, texts, unet, sampler)
    else:
        pipe = assemble_pipeline(vae, texts["text_encoder"], texts["tokenizer"], unet, sampler)
    return LoadedModel(pipe=pipe.to(device), label=source.name, source=source, scheduler=scheduler)


def text_parts(model: ModelDir) -> dict:
    """The model's tokenizer(s) and text encoder(s) in float32, by diffusers' component names."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = {"tokenizer": CLIPTokenizer.from_pretrained(model.root / "tokenizer"),
             "text_encoder": CLIPTextModel.from_pretrained(model.root / "text_encoder", torch_dtype=torch.float32,
                                                           **model.variant("text_encoder"))}  # fmt: skip
    if model.family == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(model.root / "tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            model.root / "text_encoder_2", torch_dtype=torch.float32, **model.variant("text_encoder_2")
        )
    return parts


def assemble_xl_pipeline(model: ModelDir, vae, texts: dict, unet, scheduler):
    """A StableDiffusionXLPipeline from components (``texts``: text_parts); no watermarker, and empty negative prompts
    as zeros when model_index.json says so (SDXL base does)."""
    from diffusers import StableDiffusionXLPipeline

    zeros = model.model_index().get("force_zeros_for_empty_prompt", True)
    pipe = StableDiffusionXLPipeline(vae=vae, **texts, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=bool(zeros),
                                     add_watermarker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
