"""bf.trainer: quantization of the UNet (grid, scale init, fake-quant, PTQ; QAT later).

Imports ``bf.format`` for the grid and the packed checkpoint; never imports
``bf.export`` or ``bf.runtime``.
"""
