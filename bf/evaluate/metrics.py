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


def verdicts(images: np.ndarray, scenes: list[Scene | None], palette: dict | None = None, diamonds: bool = False) -> list[dict | None]:
    """The detector's verdicts per image (None where the prompt is not a shapes scene); ``palette``: the colors the
    detector tells apart (default: the shapes palette); ``diamonds``: it also tells diamonds (bf.shapes.detect)."""
    return [judge(sc, detect(img, palette, diamonds)) if sc is not None else None for img, sc in zip(images, scenes, strict=True)]


def accuracy(images: np.ndarray, scenes: list[Scene | None]) -> dict:
    """Mean verdict per attribute over images whose prompt is a shapes scene.

    Single- and two-object prompts are judged on different attributes: each attribute is
    averaged over the images judged on it, ``overall`` over all of them.
    """
    return accuracy_of(verdicts(images, scenes))


def accuracy_of(judged: list[dict | None]) -> dict:
    """``accuracy`` from verdicts already made."""
    judged = [v for v in judged if v is not None]
    keys = dict.fromkeys(k for v in judged for k in v)  # first-seen order
    return {k: float(np.mean([v[k] for v in judged if k in v])) for k in keys}


def image_mse(images: np.ndarray, ref_images: np.ndarray) -> np.ndarray:
    """Pixel MSE of each image against its reference (images scaled to [0, 1])."""
    diff = images.astype(np.float64) / 255 - ref_images.astype(np.float64) / 255
    return (diff**2).reshape(len(images), -1).mean(axis=1)
