"""A diffusers model directory whose UNet is a .bfq's packed codes (what ``bf to-diffusers`` writes).

The base model's files as they are, and ``unet/``: the .bfq's UNet config with ``quantization_config``
(bf.diffusers.config) added, and one safetensors file holding, for every quantized layer ``L``, ``L.codes``
(uint8, the .bfq's packing, docs/FORMAT.md) and ``L.scale`` (float32 per output channel), and every other
UNet tensor as the .bfq stores it. No dequantized copy of a quantized weight is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bf.atomic import atomic_dir
from bf.format import Checkpoint
from bf.models.directory import copy_base

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def quantization_config(ckpt: Checkpoint, keep_decoded: bool = False) -> dict:
    from bf.diffusers.config import BitsFusionConfig

    layers = {n: {"shape": list(ly.shape), "bits": ly.grid.bits, "grid": ly.grid.kind} for n, ly in sorted(ckpt.layers.items())}
    return BitsFusionConfig(layers, keep_decoded).to_dict()


def write_diffusers_model(ckpt: Checkpoint, base: Path, out: Path, keep_decoded: bool = False) -> None:
    """``out``: ``base``'s text encoder, tokenizer, VAE, scheduler and model_index.json, and the packed UNet."""
    from safetensors.numpy import save_file

    with atomic_dir(out) as tmp:
        copy_base(base, tmp)
        (tmp / "unet").mkdir()
        config = {"_class_name": "UNet2DConditionModel", **ckpt.unet_config, "quantization_config": quantization_config(ckpt, keep_decoded)}
        (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: np.ascontiguousarray(v) for k, v in ckpt.tensors.items()}
        for name, layer in ckpt.layers.items():
            tensors[f"{name}.codes"] = np.ascontiguousarray(layer.codes, dtype=np.uint8)
            tensors[f"{name}.scale"] = np.ascontiguousarray(layer.scale, dtype=np.float32)
        save_file(tensors, str(tmp / "unet" / UNET_WEIGHTS), metadata={"format": "pt", "bitsfusion": "packed codes and scales"})
