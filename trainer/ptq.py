"""Post-training quantization of a UNet state dict into a packed checkpoint (no training)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from bf.errors import BfError
from bf.format import Grid, QuantizedLayer, has_added_embedding, is_time_layer
from bf.trainer.quantizer import DEFAULT_ALT_ITERS, init_scale, quantize_levels


@dataclass(frozen=True)
class PTQConfig:
    init: str = "alt"
    iters: int = DEFAULT_ALT_ITERS


def quantize_weight(name: str, w: torch.Tensor, grid: Grid, cfg: PTQConfig) -> QuantizedLayer:
    w = w.float()
    if not torch.isfinite(w).all():
        raise BfError(f"UNet weight {name}.weight has NaN or infinite values; the model is damaged")
    s = init_scale(w, grid, cfg.init, cfg.iters)
    q = quantize_levels(w, s, grid)
    return QuantizedLayer.from_levels(name, q.to(torch.int16).numpy(), s.numpy(), grid)


def quantize_state_dict(
    state: dict[str, torch.Tensor],
    plan: dict[str, Grid],
    cfg: PTQConfig,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> tuple[dict[str, QuantizedLayer], dict[str, np.ndarray]]:
    """Quantize every planned layer; keep the rest (see ``kept_tensors``)."""
    layers = {}
    for name in progress(list(plan)):
        layers[name] = quantize_weight(name, state[f"{name}.weight"], plan[name], cfg)
    return layers, kept_tensors(state, {f"{name}.weight" for name in plan})


def kept_tensors(state: dict[str, torch.Tensor], quantized: set[str]) -> dict[str, np.ndarray]:
    """The unquantized tensors as a checkpoint stores them: time layers in float32 (they build
    the time-feature table later), everything else (biases, norms) in float16, as deployed."""
    added = has_added_embedding(state)
    return {
        k: v.detach().to(torch.float32 if is_time_layer(k, added) else torch.float16).cpu().numpy()
        for k, v in state.items()
        if k not in quantized
    }
