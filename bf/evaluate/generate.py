"""Batched generation with per-image seeds: the same (prompt, seed) gives the same
initial noise whatever the batch it runs in."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def decode_latents(vae, latents):
    import torch

    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor).sample
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(
    pipe,
    jobs: list[tuple[str, int]],
    cfg: float,
    steps: int,
    batch_size: int = 16,
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and final latents (N, 4, h, w) for (prompt, seed) jobs."""
    import torch

    device = pipe.unet.device
    images, latents = [], []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in chunk]
        shape = (len(chunk), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        init = torch.stack([torch.randn(shape[1:], generator=g) for g in gens]).to(device)
        with torch.no_grad():
            out = pipe(
                prompt=[p for p, _ in chunk],
                guidance_scale=cfg,
                num_inference_steps=steps,
                latents=init,
                output_type="latent",
            )
        lat = out.images
        images.append(decode_latents(pipe.vae, lat))
        latents.append(lat.float().cpu().numpy())
        on_batch(len(chunk))
    return np.concatenate(images), np.concatenate(latents)
