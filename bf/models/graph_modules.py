"""The text encoder and VAE decoder as the exported graphs compute them; shared by export (which
traces them) and the runtime's PyTorch backend (which runs them), so both agree by construction."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoderGraph(nn.Module):
    """Token ids (batch, 77) -> last hidden states: what the UNet is conditioned on."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids).last_hidden_state


class VaeDecoderGraph(nn.Module):
    """Sampler latents -> image in [0, 1] (NCHW): the scaling factor and the clamp are in the graph."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent / self.scaling).sample
        return (image / 2 + 0.5).clamp(0, 1)
