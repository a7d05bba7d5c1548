"""Quantization-aware training pieces (docs/RECIPE.md section 5).

A UNet gets a fake-quant parametrization on every planned weight: the latent FP weight
stays a parameter, and a per-output-channel scale (initialised by min-max or the
alternating optimisation) becomes one; the forward sees ``s * clip(round(w / s))``.
Stage I distils from the frozen FP teacher (noise and block features); Stage II
regresses the true noise. Both drop the text to the empty prompt 10% of the time (for
teacher and student alike) and draw timesteps from Beta(3, 1) scaled to [0, 999].
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils import parametrize

from bf.errors import BfError
from bf.format import Grid, QuantizedLayer
from bf.trainer.quantizer import fake_quantize, init_scale, lsq_grad_scale, quantize_levels

TIMESTEP_SAMPLING = ("beta", "uniform")
BETA_ALPHA, BETA_BETA = 3.0, 1.0
DEFAULT_FEATURE_WEIGHT = 0.01
DEFAULT_P_UNCOND = 0.1
# AdamW moves a scale by about --lr per step whatever its size, so a scale smaller than the rate
# could step through zero to a weight no packing stores: every scale is held at or above this
# fraction of its initial value (hold_scales, after each optimizer step).
SCALE_FLOOR = 1e-3


def sample_timesteps(batch: int, mode: str = "beta", n_train: int = 1000, generator: torch.Generator | None = None, device=None):
    """Integer timesteps: Beta(3, 1) * (n_train - 1), rounded (more near t = 999), or uniform."""
    if mode == "uniform":
        return torch.randint(0, n_train, (batch,), generator=generator, device=device)
    if mode != "beta":
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {mode!r}")
    # Beta(a, 1) by inversion: F(x) = x^a, so x = U^(1/a).
    u = torch.rand(batch, generator=generator, device=device)
    return torch.round(u ** (1 / BETA_ALPHA) * (n_train - 1)).long()


class FakeQuantWeight(nn.Module):
    """Parametrization ``w -> s * clip(round(w / s))`` with a learnable per-row scale."""

    def __init__(self, weight: torch.Tensor, grid: Grid, init: str = "alt"):
        super().__init__()
        self.grid = grid
        s0 = init_scale(weight.detach().float(), grid, init)
        self.scale = nn.Parameter(s0.to(weight.dtype))
        # Positive and representable in the weight's dtype; never above the initial scale.
        tiny = torch.full_like(s0, torch.finfo(weight.dtype).tiny)
        # A plain attribute, not a buffer: DistributedDataParallel would broadcast a buffer every step.
        self.floor = torch.maximum(s0 * SCALE_FLOOR, torch.minimum(tiny, s0)).to(weight.dtype)
        self.grad_scale = lsq_grad_scale(weight, grid)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale.to(w.dtype), self.grid, self.grad_scale)


def attach_fake_quant(unet: nn.Module, plan: dict[str, Grid], init: str = "alt") -> dict[str, FakeQuantWeight]:
    """Fake-quantize ``module.weight`` of every planned module, in place."""
    quants = {}
    for name, grid in plan.items():
        module = unet.get_submodule(name)
        fq = FakeQuantWeight(module.weight, grid, init)
        parametrize.register_parametrization(module, "weight", fq, unsafe=True)
        quants[name] = fq
    return quants


def latent_weight(unet: nn.Module, name: str) -> torch.Tensor:
    return unet.get_submodule(name).parametrizations.weight.original


def hold_scales(quants: dict[str, FakeQuantWeight]) -> None:
    """Puts every learned scale below its floor back on it: positive by construction. One fused
    update over all layers, capturable in a CUDA graph; a NaN stays NaN (and stops the run)."""
    if quants:
        with torch.no_grad():
            torch._foreach_maximum_([fq.scale for fq in quants.values()], [fq.floor for fq in quants.values()])


def scale_health(quants: dict[str, FakeQuantWeight]) -> tuple[int, int]:
    """(scales no packing holds: not finite, scales held at their floor now), with one device sync."""
    if not quants:
        return 0, 0
    counts = torch.stack([torch.stack([unpackable_scales(fq.scale).sum(), (fq.scale <= fq.floor).sum()]) for fq in quants.values()]).sum(0)
    bad, held = counts.tolist()
    return int(bad), int(held)


def unpackable_scales(scale: torch.Tensor) -> torch.Tensor:
    """Mask of learned scales no packing holds: not finite, or not positive."""
    return ~torch.isfinite(scale) | (scale <= 0)


def export_layers(unet: nn.Module, quants: dict[str, FakeQuantWeight]) -> dict[str, QuantizedLayer]:
    """Packed layers from the latent weights and learned scales: the levels the forward used."""
    out = {}
    for name, fq in quants.items():
        w = latent_weight(unet, name).detach().float().cpu()
        s = fq.scale.detach().float().cpu()
        bad = int(unpackable_scales(s).sum())
        if bad:
            raise BfError(f"{name}: {bad} learned scale(s) are not positive and finite; retrain from an earlier state with a lower --lr")
        q = quantize_levels(w, s, fq.grid)
        out[name] = QuantizedLayer.from_levels(name, q.to(torch.int16).numpy(), s.numpy(), fq.grid)
    return out


def block_names(unet: nn.Module) -> list[str]:
    """Feature-distillation taps: the output of every down and up block (ours; the paper names none finer)."""
    return [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


@contextmanager
def capture_blocks(unet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Collects each block's hidden-state output during forwards inside the context."""
    feats: dict[str, torch.Tensor] = {}
    handles = []
    unet = getattr(unet, "module", unet)  # under DistributedDataParallel: the wrapped UNet
    for name in block_names(unet):

        def hook(_m, _inp, out, name=name):
            feats[name] = out[0] if isinstance(out, tuple) else out  # down blocks return (hidden, residuals)

        handles.append(unet.get_submodule(name).register_forward_hook(hook))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class LossConfig:
    feature_weight: float = DEFAULT_FEATURE_WEIGHT  # lambda; 0 turns feature distillation off
    p_uncond: float = DEFAULT_P_UNCOND
    timesteps: str = "beta"


def drop_text(cond: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace whole prompts by the empty prompt's encoding with probability ``p``."""
    drop = (torch.rand(cond.shape[0], generator=generator) < p).to(cond.device)  # on the generator's device (CPU)
    return torch.where(drop[:, None, None], empty.expand_as(cond), cond)


def stage1_loss(student, teacher, zt, t, cond, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Noise distillation + lambda * mean over blocks of the block-output MSE.

    ``cond`` already has its dropped prompts (the same for both models)."""
    loss, noise, feat = stage1_terms(student, teacher, zt, t, cond, cfg)
    return loss, _to_host(loss=loss, noise=noise, feature=feat)


def stage1_terms(student, teacher, zt, t, cond, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Stage I loss and its two terms as device tensors (no host sync: CUDA graphs can capture it)."""
    with torch.no_grad(), capture_blocks(teacher) as t_feats:
        eps_t = teacher(zt, t, cond).sample
    with capture_blocks(student) as s_feats:
        eps_s = student(zt, t, cond).sample
    noise = F.mse_loss(eps_s.float(), eps_t.float())
    if cfg.feature_weight > 0:
        feat = torch.stack([F.mse_loss(s_feats[k].float(), t_feats[k].float()) for k in t_feats]).mean()
    else:
        feat = noise.new_zeros(())
    return noise + cfg.feature_weight * feat, noise, feat


def stage2_loss(student, zt, t, cond, noise) -> tuple[torch.Tensor, dict[str, float]]:
    """Noise prediction against the true noise."""
    (loss,) = stage2_terms(student, zt, t, cond, noise)
    return loss, loss_parts(2, (loss,))


def stage2_terms(student, zt, t, cond, noise) -> tuple[torch.Tensor]:
    """The Stage II loss as a device tensor (no host sync)."""
    return (F.mse_loss(student(zt, t, cond).sample.float(), noise.float()),)


def loss_parts(stage: int, terms: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """The logged loss terms of a step, from stage1_terms' (loss, noise, feature) or Stage II's (loss,)."""
    if stage == 1:
        return _to_host(loss=terms[0], noise=terms[1], feature=terms[2])
    return _to_host(loss=terms[0], noise=terms[0])


def _to_host(**scalars: torch.Tensor) -> dict[str, float]:
    """Scalar tensors as floats with one device sync (this runs every training step)."""
    return dict(zip(scalars, torch.stack([v.detach().float() for v in scalars.values()]).tolist(), strict=True))
