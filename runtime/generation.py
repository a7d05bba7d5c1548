"""Text in, images out: tokenizer, text encoder, UNet by step index with classifier-free
guidance, a NumPy sampler and the VAE decoder, on any backend with the three graph calls.

The initial noise comes from NumPy's seeded generator, so every backend starts from the same
latents; unconditional and conditional predictions are one batched UNet call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bf.errors import BfError
from bf.runtime.exported import ExportedModel
from bf.runtime.schedulers import make_scheduler


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # default: what the model was exported for
    cfg: float = 7.5
    seed: int = 1024
    scheduler: str | None = None
    height: int | None = None  # default: the export's resolution
    width: int | None = None
    num_images: int = 1
    original_size: tuple[int, int] | None = None  # SDXL micro-conditioning (height, width); default: the image's size
    crop: tuple[int, int] = (0, 0)  # SDXL micro-conditioning: crop top, left


@dataclass
class Generation:
    images: np.ndarray  # (K, H, W, 3) uint8
    latents: np.ndarray  # the initial noise (K, C, h, w) float32
    timings: dict[str, float]  # seconds per stage
    dropped_tokens: int
    settings: dict


def initial_latents(seed: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * sigma).astype(np.float32)


def encode_prompts(model: ExportedModel, backend, req: GenerationRequest, height: int, width: int):
    """(negative, positive) conditioning: hidden states (2, 77, D), SDXL's added conditioning (text_embeds and
    time_ids, each of 2 rows; None for SD-v1.5), and the tokens the prompt lost to the 77-token limit.

    SDXL as diffusers' StableDiffusionXLPipeline runs it: both encoders' penultimate hidden states side by side, the
    second's pooled projection, micro-conditioning (original size: ``req.original_size``, default height x width;
    crop corner: ``req.crop``, default 0, 0; target size: height x width); an empty negative prompt is all zeros where the model says so
    (SDXL base's ``force_zeros_for_empty_prompt``; diffusers does this for no negative prompt)."""
    m = model.manifest
    (neg_ids, _), (ids, dropped) = model.tokenizer.encode(req.negative_prompt), model.tokenizer.encode(req.prompt)
    hidden = backend.text_encoder(np.array([neg_ids, ids], dtype=np.int64))
    if m.family != "sdxl":
        return hidden, None, dropped
    (neg_ids, _), (ids, dropped_2) = model.tokenizer_2.encode(req.negative_prompt), model.tokenizer_2.encode(req.prompt)
    hidden_2, pooled = backend.text_encoder_2(np.array([neg_ids, ids], dtype=np.int64))
    hidden = np.concatenate([hidden, hidden_2], axis=-1).astype(np.float32)
    pooled = np.asarray(pooled, dtype=np.float32)
    if req.negative_prompt == "" and m.force_zeros_for_empty_prompt:
        hidden[0], pooled[0] = 0.0, 0.0
    original = req.original_size or (height, width)
    time_ids = np.array([[*original, *req.crop, height, width]] * 2, dtype=np.float32)
    return hidden, {"text_embeds": pooled, "time_ids": time_ids}, max(dropped, dropped_2)


def checked_sampler(model: ExportedModel, req: GenerationRequest):
    """Everything about ``req`` that can be refused, checked against the export without running it (callers check
    before they open a backend): returns the sampler, its name, the step count and the image size."""
    m = model.manifest
    name = req.scheduler or m.scheduler.name
    steps = m.scheduler.steps if req.steps is None else req.steps
    if steps < 1:
        raise BfError(f"--steps {steps}: must be at least 1")
    model.check_sampler(name, steps)
    height, width = model.image_size(req.height, req.width)
    if req.num_images < 1:
        raise BfError(f"--num-images {req.num_images}: must be at least 1")
    if m.family != "sdxl" and (req.original_size is not None or tuple(req.crop) != (0, 0)):
        raise BfError(f"--original-size and --crop are SDXL's micro-conditioning; {model.root} is an SD-v1.5-style export")
    sampler = make_scheduler(name, model.scheduler_config, steps)
    if not np.array_equal(sampler.timesteps, np.asarray(m.scheduler.timesteps)):
        raise BfError(f"{model.root}: the sampler's timesteps differ from the ones the time table was built for; export again")
    return sampler, name, steps, height, width


def generate(model: ExportedModel, backend, req: GenerationRequest, progress: Callable[[int, int], None] = lambda i, n: None) -> Generation:
    m = model.manifest
    sampler, name, steps, height, width = checked_sampler(model, req)
    scale = m.image.latent_scale
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    k = req.num_images
    hidden, added, dropped = encode_prompts(model, backend, req, height, width)

    def per_image(pair: np.ndarray) -> np.ndarray:  # (negative, positive) -> k negatives, then k positives
        return np.concatenate([np.repeat(pair[:1], k, 0), np.repeat(pair[1:], k, 0)])

    context = per_image(hidden)
    if added is not None:
        added = {key: per_image(a) for key, a in added.items()}
    timings["text_encoder_s"] = time.perf_counter() - t0

    # Image i starts from seed + i alone, so any image of a batch is reproduced by its own seed with --num-images 1.
    shape = (1, m.latent_channels, height // scale, width // scale)
    latents = np.concatenate([initial_latents(req.seed + i, shape, sampler.init_noise_sigma) for i in range(k)])
    start = latents.copy()
    t0 = time.perf_counter()
    for i in range(len(sampler.timesteps)):
        model_input = sampler.scale_model_input(latents, i)
        noise = backend.unet(np.concatenate([model_input, model_input]), i, context, added)
        uncond, cond = noise[:k], noise[k:]
        latents = sampler.step((uncond + np.float32(req.cfg) * (cond - uncond)).astype(np.float32), i, latents)
        progress(i + 1, len(sampler.timesteps))
    timings["unet_s"] = time.perf_counter() - t0
    timings["unet_per_step_ms"] = 1e3 * timings["unet_s"] / len(sampler.timesteps)

    t0 = time.perf_counter()
    image = backend.vae_decoder(latents)  # (K, 3, H, W) in [0, 1]
    timings["vae_decoder_s"] = time.perf_counter() - t0
    images = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    settings = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "seed": req.seed,
        "steps": steps,
        "cfg": req.cfg,
        "scheduler": name,
        "height": height,
        "width": width,
        **({"original_size": list(req.original_size or (height, width)), "crop": list(req.crop)} if m.family == "sdxl" else {}),
        "model_sha256": m.model.sha256,
        "backend": getattr(backend, "name", "?"),
    }
    return Generation(images, start, timings, dropped, settings)
