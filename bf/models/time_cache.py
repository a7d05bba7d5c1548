"""Time-embedding pre-computing and caching (docs/RECIPE.md section 4).

For a sampler and step count, every ResBlock's projected time feature
``time_emb_proj(silu(time_embedding(time_proj(t))))`` is computed once for each timestep
the sampler will call the UNet with. ``cache_time_features`` then swaps the time layers
for lookups into that table, so the UNet takes a *step index* instead of a timestep:
the form the exported graph has.

With SDXL's added embedding the ResBlocks see ``time_embedding(time_proj(t)) +
add_embedding(pooled prompt, micro-conditioning)``: only the first term depends on the
timestep alone. There the table holds the time embedding (one 1280-wide row per step,
``time_embedding.table``); the added embedding and the ResBlocks' projections are computed
in the UNet from its ``text_embeds`` and ``time_ids`` inputs, as ordinary (quantized) layers.
"""

from __future__ import annotations

import torch
from torch import nn

from bf.errors import BfError
from bf.models.added_condition import has_added_embedding, pooled_dim, unpack


def sampler_timesteps(scheduler_name: str, scheduler_config: dict, steps: int) -> torch.Tensor:
    """The timesteps the sampler feeds the UNet, in call order (PNDM repeats one)."""
    from bf.models.diffusers_pipeline import make_scheduler

    sched = make_scheduler(scheduler_name, scheduler_config)
    sched.set_timesteps(steps)
    ts = torch.as_tensor(sched.timesteps)
    if not torch.equal(ts, ts.round()):  # Euler's linspace spacing: the table and the runtime hold whole timesteps
        spacing = scheduler_config.get("timestep_spacing", "linspace (its default)")
        raise BfError(f"{scheduler_name} with timestep_spacing {spacing!r} gives fractional timesteps, which the time table does "
                      "not hold; set \"timestep_spacing\": \"leading\" in the model's scheduler_config.json, or pick another "
                      "--scheduler")  # fmt: skip
    return ts.long()


def resblock_time_projections(unet: nn.Module) -> dict[str, nn.Module]:
    """ResBlock name -> its time_emb_proj, in module order."""
    return {name: m.time_emb_proj for name, m in unet.named_modules() if getattr(m, "time_emb_proj", None) is not None}


@torch.no_grad()
def time_feature_table(unet: nn.Module, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """ResBlock name -> (len(timesteps), channels) features, float32, as the UNet computes them; with an added
    embedding (SDXL), {"time_embedding": (len(timesteps), width)}: the time embedding alone."""
    t = timesteps.to(next(unet.parameters()).device)
    emb = unet.time_embedding(unet.time_proj(t).to(next(unet.time_embedding.parameters()).dtype))
    if has_added_embedding(unet):
        return {"time_embedding": emb.float()}
    if getattr(unet, "time_embed_act", None) is not None:
        emb = unet.time_embed_act(emb)
    out = {}
    for name, proj in resblock_time_projections(unet).items():
        block = unet.get_submodule(name)
        out[name] = proj(emb if getattr(block, "skip_time_act", False) else block.nonlinearity(emb)).float()
    return out


class StepIndex:
    """The step index every lookup of one UNet reads (set once per forward)."""

    def __init__(self):
        self.index: torch.Tensor | None = None


class TimeFeatureLookup(nn.Module):
    """Stands in for a ResBlock's time_emb_proj: returns its row of the table."""

    def __init__(self, table: torch.Tensor, step: StepIndex):
        super().__init__()
        self.register_buffer("table", table)
        self.step = step

    def forward(self, _temb: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, self.step.index)


class TimeEmbeddingLookup(TimeFeatureLookup):
    """Stands in for the time-embedding MLP where an added embedding follows it (SDXL): its row of the table."""

    def forward(self, _sample: torch.Tensor, condition=None) -> torch.Tensor:
        return self.table.index_select(0, self.step.index)


class ZeroTimeEmbedding(nn.Module):
    """Stands in for the time-embedding MLP: its output only fed the projections."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, sample: torch.Tensor, condition=None) -> torch.Tensor:
        return sample.new_zeros(sample.shape[0], self.dim)


class CachedTimeUNet(nn.Module):
    """``forward(sample, step_index, encoder_hidden_states[, text_embeds, time_ids])`` over a UNet whose time
    layers were replaced by table lookups. ``step_index``: an int or a (batch,) tensor. ``text_embeds`` (the
    pooled prompt) and ``time_ids`` (original size, crop corner, target size): an SDXL UNet's added conditioning."""

    def __init__(self, unet: nn.Module, step: StepIndex, timesteps: torch.Tensor):
        super().__init__()
        self.unet, self.step = unet, step
        self.register_buffer("timesteps", timesteps)
        self.added = has_added_embedding(unet)
        self.pooled = pooled_dim(unet.config) if self.added else 0

    def forward(self, sample: torch.Tensor, step_index, encoder_hidden_states: torch.Tensor, text_embeds=None, time_ids=None,
                timestep=0) -> torch.Tensor:  # fmt: skip
        """``timestep`` is ignored (the table holds its features); pass a device tensor when
        capturing a CUDA graph, where turning the int into one would copy from the host."""
        if self.added and text_embeds is None and time_ids is None:  # packed after the hidden states (bf.models.added_condition)
            encoder_hidden_states, text_embeds, time_ids = unpack(encoder_hidden_states, self.pooled)
        if self.added != (text_embeds is not None and time_ids is not None):
            raise ValueError("an SDXL UNet takes text_embeds and time_ids (or them packed after the hidden states); an SD-v1.5 one neither")
        idx = torch.as_tensor(step_index, device=sample.device).long().reshape(-1).expand(sample.shape[0])
        self.step.index = idx
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.added else None
        try:
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added).sample
        finally:
            self.step.index = None


def cache_time_features(unet: nn.Module, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32) -> CachedTimeUNet:
    """Replace (in place) the time-embedding MLP and every time projection of ``unet`` by
    lookups into the table for ``timesteps`` (with an added embedding: the time-embedding MLP alone).
    ``dtype=float16`` rounds the table as the deployed model stores it."""
    table = time_feature_table(unet, timesteps)
    step = StepIndex()
    param_dtype = next(unet.parameters()).dtype
    if has_added_embedding(unet):
        unet.time_embedding = TimeEmbeddingLookup(table["time_embedding"].to(dtype).to(param_dtype), step)
        return CachedTimeUNet(unet, step, timesteps.clone())
    for name, feats in table.items():
        unet.get_submodule(name).time_emb_proj = TimeFeatureLookup(feats.to(dtype).to(param_dtype), step)
    unet.time_embedding = ZeroTimeEmbedding(unet.time_embedding.linear_2.out_features)
    return CachedTimeUNet(unet, step, timesteps.clone())
