"""SDXL's added conditioning (the pooled prompt and the six micro-conditioning values) carried in the tensor of
the encoder hidden states.

The trainer moves one conditioning tensor per batch through its caption cache, prompt drop, DDP and captured
CUDA-graph steps. For an SDXL UNet that tensor holds the two text encoders' hidden states and, in rows after
the tokens, the pooled prompt and the time ids (``pack``); ``unpack_on_forward`` hooks the UNet so that it
splits them again before its forward. The module tree is unchanged, so state dicts, block hooks and the
quantized-layer swaps see the plain diffusers UNet.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TIME_IDS = 6  # original height and width, crop top and left, target height and width


def has_added_embedding(unet: nn.Module) -> bool:
    """Whether a UNet module has SDXL's text_time added embedding (its parameter names: bf.format.has_added_embedding)."""
    return getattr(unet, "add_embedding", None) is not None


def pooled_dim(unet_config) -> int:
    """Width of the pooled prompt an SDXL UNet's added embedding takes."""
    cfg = dict(unet_config)
    return int(cfg["projection_class_embeddings_input_dim"]) - TIME_IDS * int(cfg["addition_time_embed_dim"])


def extra_rows(hidden_dim: int, pooled: int) -> int:
    return math.ceil((pooled + TIME_IDS) / hidden_dim)


def micro_conditioning(height: int, width: int) -> list[float]:
    """The time ids of an uncropped image generated at its own size: (h, w, 0, 0, h, w)."""
    return [float(height), float(width), 0.0, 0.0, float(height), float(width)]


def pack(hidden: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D) hidden states, (B, P) pooled prompt and (B, 6) time ids -> (B, T + rows, D)."""
    b, _, d = hidden.shape
    rows = extra_rows(d, text_embeds.shape[1])
    tail = torch.cat([text_embeds.to(hidden.dtype), time_ids.to(hidden.dtype)], dim=1)
    tail = torch.nn.functional.pad(tail, (0, rows * d - tail.shape[1])).reshape(b, rows, d)
    return torch.cat([hidden, tail], dim=1)


def unpack(packed: torch.Tensor, pooled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, _, d = packed.shape
    rows = extra_rows(d, pooled)
    tail = packed[:, -rows:].reshape(b, rows * d)
    return packed[:, :-rows], tail[:, :pooled], tail[:, pooled : pooled + TIME_IDS]


def unpack_on_forward(unet: nn.Module):
    """Make ``unet(sample, t, packed)`` run as ``unet(sample, t, hidden, added_cond_kwargs=...)``; a call that gives
    ``added_cond_kwargs`` itself (a diffusers pipeline's) is left alone. The hook's handle."""
    pooled = pooled_dim(unet.config)

    def hook(_module, args, kwargs):
        if kwargs.get("added_cond_kwargs") is not None:  # a pipeline's own call: nothing packed
            return None
        args = list(args)
        packed = args[2] if len(args) >= 3 else kwargs.pop("encoder_hidden_states")
        hidden, text_embeds, time_ids = unpack(packed, pooled)
        if len(args) >= 3:
            args[2] = hidden
        else:
            kwargs["encoder_hidden_states"] = hidden
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return tuple(args), kwargs

    return unet.register_forward_pre_hook(hook, with_kwargs=True)
