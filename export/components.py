"""The exportable PyTorch modules of a .bfq (text encoder, UNet, VAE decoder; SDXL: and the second text encoder), and
example inputs of the export's shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bf.export.torch_modules import swap_quantized_layers
from bf.models.added_condition import pooled_dim
from bf.models.graph_modules import VaeDecoderGraph, text_encoder_graphs
from bf.models.time_cache import cache_time_features, sampler_timesteps
from bf.native_size import size_rule

MAX_TOKENS = 77


@dataclass
class Components:
    text_encoder: torch.nn.Module
    unet: torch.nn.Module  # forward(sample, step, encoder_hidden_states[, text_embeds, time_ids])
    vae_decoder: torch.nn.Module
    timesteps: list[int]  # the sampler's UNet calls, in order: the rows of the time-feature table
    latent_channels: int
    latent_scale: int  # image pixels per latent pixel
    hidden_size: int  # of the UNet's encoder_hidden_states (SDXL: both text encoders' side by side)
    text_encoder_2: torch.nn.Module | None = None  # SDXL: input_ids -> (hidden_states, text_embeds)
    pooled_size: int = 0  # SDXL: width of text_embeds
    size_multiple: int = 8  # image sizes the UNet graph takes: multiples of the latent scale x its downsampling

    @property
    def family(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd15"


def build_components(pipe, layers: dict, scheduler: str, steps: int) -> Components:
    """Float32 modules over a pipeline (a .bfq's UNet already dequantized, or an FP model).

    The UNet's time layers become lookups into the table for ``scheduler`` at ``steps`` and
    its quantized ``layers`` (a checkpoint's; none for an FP model) become dequant-op modules
    over the packed codes. The pipeline's
    modules are used in place, not copied (a full-size model would need twice the memory):
    ``pipe`` is not usable for sampling afterwards."""
    timesteps = sampler_timesteps(scheduler, dict(pipe.scheduler.config), steps)
    unet = cache_time_features(pipe.unet.float().eval(), timesteps)
    swap_quantized_layers(unet.unet, layers)
    texts = {name: m.float().eval() for name, m in text_encoder_graphs(pipe).items()}
    vae = VaeDecoderGraph(pipe.vae).float().eval()
    return Components(
        text_encoder=texts["text_encoder"],
        unet=unet.eval(),
        vae_decoder=vae,
        timesteps=[int(t) for t in timesteps],
        latent_channels=int(pipe.unet.config.in_channels),
        latent_scale=int(pipe.vae_scale_factor),
        hidden_size=int(pipe.unet.config.cross_attention_dim),
        text_encoder_2=texts.get("text_encoder_2"),
        pooled_size=pooled_dim(pipe.unet.config) if "text_encoder_2" in texts else 0,
        size_multiple=size_rule(pipe.unet.config, pipe.vae.config)[0],  # the graph traces each resampling size
    )


def example_inputs(c: Components, batch: int, height: int, width: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Random inputs of every graph, as NumPy arrays keyed by graph and input name."""
    rng = np.random.default_rng(seed)
    h, w = height // c.latent_scale, width // c.latent_scale
    out = {
        "text_encoder": {"input_ids": rng.integers(0, 1000, (batch, MAX_TOKENS)).astype(np.int64)},
        "unet": {
            "sample": rng.standard_normal((batch, c.latent_channels, h, w)).astype(np.float32),
            "step": np.array([len(c.timesteps) // 2], dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((batch, MAX_TOKENS, c.hidden_size)).astype(np.float32),
        },
        "vae_decoder": {"latent": (rng.standard_normal((batch, c.latent_channels, h, w)) * 5).astype(np.float32)},
    }
    if c.family == "sdxl":
        out["text_encoder_2"] = {"input_ids": rng.integers(0, 1000, (batch, MAX_TOKENS)).astype(np.int64)}
        out["unet"]["text_embeds"] = rng.standard_normal((batch, c.pooled_size)).astype(np.float32)
        sizes = rng.integers(1, 9, (batch, 1)) * 128  # original and target sizes, a crop corner: what SDXL was trained on
        out["unet"]["time_ids"] = np.concatenate([sizes, sizes, np.zeros((batch, 2)), sizes, sizes], axis=1).astype(np.float32)
    return out
