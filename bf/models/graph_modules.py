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


class PenultimateTextEncoderGraph(nn.Module):
    """Token ids -> the hidden states of the penultimate layer (SDXL's first text encoder: what the UNet reads)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class PooledTextEncoderGraph(nn.Module):
    """Token ids -> (penultimate hidden states, pooled projection): SDXL's second text encoder."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


def text_encoder_graphs(pipe) -> dict[str, nn.Module]:
    """The text encoder graph(s) of a pipeline, by graph name: SD-v1.5's one, or SDXL's two."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return {"text_encoder": TextEncoderGraph(pipe.text_encoder)}
    return {"text_encoder": PenultimateTextEncoderGraph(pipe.text_encoder), "text_encoder_2": PooledTextEncoderGraph(pipe.text_encoder_2)}


class VaeDecoderGraph(nn.Module):
    """Sampler latents -> image in [0, 1] (NCHW): the scaling factor and the clamp are in the graph."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latent / self.scaling).sample
        return (image / 2 + 0.5).clamp(0, 1)
