"""The frozen inputs of QAT: captions through the CLIP text encoder (cached), and the model's training
noise schedule. Shared by bf train and the short per-layer QAT of bf analyze."""

from __future__ import annotations

import torch


class TextEncoder:
    """Captions to hidden states with a frozen CLIP text encoder; repeated captions are cached."""

    def __init__(self, tokenizer, model, device, max_cached: int = 4096):
        self.tok, self.model, self.device, self.cache, self.max = tokenizer, model.to(device).eval(), device, {}, max_cached

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        todo = sorted({c for c in captions if c not in self.cache})
        if todo:
            if len(self.cache) + len(todo) > self.max:
                self.cache.clear()  # whole batch recomputed: its already-cached captions went with the rest
                todo = sorted(set(captions))
            ids = self.tok(todo, padding="max_length", max_length=self.tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            hidden = self.model(ids.to(self.device)).last_hidden_state
            self.cache.update(zip(todo, hidden, strict=True))
        return torch.stack([self.cache[c] for c in captions])


def training_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """The model's training noise schedule (one alpha-bar per timestep) from its sampler config.

    ``from_config`` reads every key the sampler shares with DDPM (beta_schedule included)
    and ignores sampler-only ones.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod
