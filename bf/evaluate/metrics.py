"""Fidelity and accuracy numbers."""

from __future__ import annotations

import math

import numpy as np

from bf.shapes.detect import detect
from bf.shapes.judge import judge
from bf.shapes.scenes import Scene


def fidelity(images: np.ndarray, ref_images: np.ndarray, latents: np.ndarray, ref_latents: np.ndarray) -> dict:
    """Pixel MSE (images scaled to [0, 1]), PSNR from that MSE (inf when identical), latent MSE."""
    mse = float(np.mean((images.astype(np.float64) / 255 - ref_images.astype(np.float64) / 255) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
    latent_mse = float(np.mean((latents.astype(np.float64) - ref_latents.astype(np.float64)) ** 2))
    return {"mse": mse, "psnr": psnr, "latent_mse": latent_mse}


def accuracy(images: np.ndarray, scenes: list[Scene]) -> dict:
    """Mean verdict per attribute over images whose prompt is a shapes scene.

    Single- and two-object prompts are judged on different attributes: each attribute is
    averaged over the images judged on it, ``overall`` over all of them.
    """
    verdicts = [judge(sc, detect(img)) for img, sc in zip(images, scenes, strict=True) if sc is not None]
    keys = dict.fromkeys(k for v in verdicts for k in v)  # first-seen order
    return {k: float(np.mean([v[k] for v in verdicts if k in v])) for k in keys}
