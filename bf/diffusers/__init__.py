"""1.99-bit models inside diffusers: ``import bf.diffusers`` registers the ``bitsfusion`` quantization
backend with diffusers (its config class and quantizer, in diffusers' own mappings), so that a directory
written by ``bf to-diffusers`` loads with ``UNet2DConditionModel.from_pretrained(DIR, subfolder="unet")`` or
``DiffusionPipeline.from_pretrained(DIR)``: the UNet's quantized layers keep their packed codes and scales
and decode their weight on every call (the CUDA kernels on a GPU, the format's exact rule on the CPU).

Needs the ``train`` extra (torch, diffusers, transformers, accelerate).
"""

from __future__ import annotations

from bf.diffusers.config import QUANT_METHOD, BitsFusionConfig
from bf.diffusers.layers import LowBitConv2d, LowBitLayer, LowBitLinear
from bf.diffusers.quantizer import BitsFusionQuantizer, register

register()

__all__ = ["QUANT_METHOD", "BitsFusionConfig", "BitsFusionQuantizer", "LowBitConv2d", "LowBitLayer", "LowBitLinear", "register"]
