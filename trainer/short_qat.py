"""A short QAT of one layer alone, for ``bf analyze --qat-steps K`` (docs/RECIPE.md section 3).

Post-training quantization alone overstates the sensitivity of layers that a few
steps of training would fix; the paper analyses layers after a short QAT. Here only
the analysed layer is trainable (its latent weight and per-channel scale), the loss
is Stage I's (noise and block-feature distillation from the FP model, empty prompt
10% of the time, Beta(3, 1) timesteps), and the rest of the UNet stays full precision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from bf.format import Grid, QuantizedLayer
from bf.trainer.data import load_latents
from bf.trainer.frozen import conditioning_for, training_alphas_cumprod
from bf.trainer.qat import LossConfig, attach_fake_quant, export_layers, hold_scales, stage1_loss
from bf.trainer.train import Frozen, noisy_batch, optimizer_step


@dataclass(frozen=True)
class ShortQATConfig:
    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    images: int = 256  # shapes images rendered once and shared by every layer
    seed: int = 0


class ShortQAT:
    """Holds what every layer's short QAT shares (``frozen``: the FP teacher, the text encoder, the data)."""

    def __init__(self, pipe, cfg: ShortQATConfig, log=lambda m: None):
        self.cfg = cfg
        teacher = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
        self.device = next(teacher.parameters()).device
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        log(f"short QAT: encoding {cfg.images} shapes images ({size}x{size}) for {cfg.steps} steps per layer and width")
        self.frozen = Frozen(
            teacher,
            conditioning_for(
                pipe.components, [teacher, pipe.unet], self.device, size, pipe.config.get("force_zeros_for_empty_prompt", True)
            ),
            load_latents("shapes", pipe.vae, size, cfg.images, cfg.seed, log),
            training_alphas_cumprod(dict(pipe.scheduler.config)).to(self.device),
        )

    def tune(self, unet: torch.nn.Module, name: str, grid: Grid, init: str) -> QuantizedLayer:
        """The layer after ``steps`` of QAT; ``unet`` is left as it was given."""
        module = unet.get_submodule(name)
        original = module.weight.detach().clone()
        was_training, grads = unet.training, {n: p.requires_grad for n, p in unet.named_parameters()}
        unet.requires_grad_(False).train()
        quants = attach_fake_quant(unet, {name: grid}, init)
        params = [module.parametrizations.weight.original.requires_grad_(True), quants[name].scale.requires_grad_(True)]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)
        # The same batches for every layer and width, so their sensitivities compare like for like.
        g = torch.Generator().manual_seed(self.cfg.seed)
        empty = self.frozen.encode_text([""])
        loss_cfg = LossConfig()
        try:
            for _ in range(self.cfg.steps):
                zt, t, cond, _noise = noisy_batch(self.frozen, empty, self.cfg.batch_size, loss_cfg, g, self.device)
                loss, _ = stage1_loss(unet, self.frozen.teacher, zt, t, cond, loss_cfg)
                optimizer_step(loss, opt)
                hold_scales(quants)
            return export_layers(unet, quants)[name]
        finally:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.no_grad():
                module.weight.copy_(original)
            for n, p in unet.named_parameters():
                p.requires_grad_(grads[n])
            unet.train(was_training)
