"""The frozen inputs of QAT: captions through the CLIP text encoder (cached), and the model's training
noise schedule. Shared by bf train and the short per-layer QAT of bf analyze."""

from __future__ import annotations

import torch

from bf.models.added_condition import has_added_embedding, micro_conditioning, pack, unpack_on_forward


class TextEncoder:
    """Captions to hidden states with a frozen CLIP text encoder; repeated captions are cached."""

    def __init__(self, tokenizer, model, device, max_cached: int = 4096):
        self.tok, self.model, self.device, self.cache, self.max = tokenizer, model.to(device).eval(), device, {}, max_cached

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        ids = self.tok(captions, padding="max_length", max_length=self.tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return self.model(ids.to(self.device)).last_hidden_state

    def __call__(self, captions: list[str]) -> torch.Tensor:
        todo = sorted({c for c in captions if c not in self.cache})
        if todo:
            if len(self.cache) + len(todo) > self.max:
                self.cache.clear()  # whole batch recomputed: its already-cached captions went with the rest
                todo = sorted(set(captions))
            self.cache.update(zip(todo, self.encode(todo), strict=True))
        return torch.stack([self.cache[c] for c in captions])


class XLTextEncoder(TextEncoder):
    """SDXL's conditioning of captions: both encoders' penultimate hidden states side by side, the second's pooled
    projection and the micro-conditioning of uncropped ``size`` x ``size`` images, packed into one tensor
    (bf.models.added_condition) for a UNet hooked with ``unpack_on_forward``. The empty caption is all zeros
    but its time ids (``zero_empty``: what SDXL's pipeline feeds for an empty negative prompt, and SDXL's
    prompt dropout in training); repeated captions are cached."""

    def __init__(self, tokenizers, models, device, size: int, zero_empty: bool = True, max_cached: int = 4096):
        self.toks, self.models = tokenizers, [m.to(device).eval() for m in models]
        self.device, self.zero_empty, self.cache, self.max = device, zero_empty, {}, max_cached
        self.time_ids = torch.tensor([micro_conditioning(size, size)], device=device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        hidden, pooled = [], None
        for tok, model in zip(self.toks, self.models, strict=True):
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            out = model(ids.to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden = torch.cat(hidden, dim=-1)
        if self.zero_empty:
            empty = torch.tensor([c == "" for c in captions], device=self.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return pack(hidden, pooled, self.time_ids.expand(len(captions), -1))


def conditioning_for(pipe_parts: dict, unets: list, device, size: int, zero_empty: bool = True):
    """The caption encoder for ``unets`` (SDXL: ``XLTextEncoder``, with each UNet hooked to unpack it; else
    ``TextEncoder``) from ``pipe_parts``' tokenizer(s) and text encoder(s) (diffusers' component names)."""
    if not has_added_embedding(unets[0]):
        return TextEncoder(pipe_parts["tokenizer"], pipe_parts["text_encoder"], device)
    for unet in unets:
        unpack_on_forward(unet)
    return XLTextEncoder([pipe_parts["tokenizer"], pipe_parts["tokenizer_2"]], [pipe_parts["text_encoder"], pipe_parts["text_encoder_2"]],
                         device, size, zero_empty)  # fmt: skip


def training_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The model's training noise schedule (one alpha-bar per timestep) from its sampler config.

    ``from_config`` reads every key the sampler shares with DDPM (beta_schedule included)
    and ignores sampler-only ones.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod
