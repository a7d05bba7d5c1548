"""The low-bit dequant op: the one definition the exporter, the runtimes and the TensorRT plugin share.

In an exported graph every quantized weight is one node ``bitsfusion::LowBitDequant``:

- inputs: ``codes`` (uint8, 1-D: the layer's packed buffer exactly as in the .bfq, see
  docs/FORMAT.md section 4) and ``scale`` (float32 or float16, one per output channel);
- attributes: ``bits``, ``grid`` (``balanced`` or ``plain``), the packing (``levels``,
  ``per_field``, ``field_bits``), ``shape`` (the weight's shape) and ``dtype`` (ONNX element
  type of the output: 1 float32, 10 float16, 16 bfloat16);
- output: the weight ``scale[o] * (code - 2^(bits-1))`` of ``shape``, in ``dtype``.

The packing attributes are redundant with ``bits`` and ``grid`` on purpose: a decoder
reads the layout from the node and checks it against the grid instead of re-deriving it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bf.format.checkpoint import QuantizedLayer
from bf.format.grid import Grid
from bf.format.packing import Packing

DOMAIN = "bitsfusion"
OP_TYPE = "LowBitDequant"
OP_VERSION = 1  # the opset version of DOMAIN; also the TensorRT plugin version string

INPUTS = ("codes", "scale")
ATTR_BITS = "bits"
ATTR_GRID = "grid"
ATTR_LEVELS = "levels"
ATTR_PER_FIELD = "per_field"
ATTR_FIELD_BITS = "field_bits"
ATTR_SHAPE = "shape"
ATTR_DTYPE = "dtype"
ATTRIBUTES = (ATTR_BITS, ATTR_GRID, ATTR_LEVELS, ATTR_PER_FIELD, ATTR_FIELD_BITS, ATTR_SHAPE, ATTR_DTYPE)

# ONNX TensorProto element types the op may produce (numbers fixed by onnx.proto).
DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}


@dataclass(frozen=True)
class DequantSpec:
    """One node's attributes, validated."""

    shape: tuple[int, ...]
    grid: Grid
    dtype: int = 1

    @property
    def packing(self) -> Packing:
        return Packing.for_grid(self.grid)

    def attributes(self) -> dict:
        p = self.packing
        return {
            ATTR_BITS: self.grid.bits,
            ATTR_GRID: self.grid.kind,
            ATTR_LEVELS: p.levels,
            ATTR_PER_FIELD: p.per_field,
            ATTR_FIELD_BITS: p.field_bits,
            ATTR_SHAPE: list(self.shape),
            ATTR_DTYPE: self.dtype,
        }

    @classmethod
    def from_attributes(cls, attrs: dict) -> DequantSpec:
        """The spec of a node; ValueError naming the first missing or inconsistent attribute."""
        missing = [a for a in ATTRIBUTES if a not in attrs]
        if missing:
            raise ValueError(f"{OP_TYPE}: missing attribute(s) {', '.join(missing)}")
        grid_kind = attrs[ATTR_GRID].decode() if isinstance(attrs[ATTR_GRID], bytes) else attrs[ATTR_GRID]
        grid = Grid(int(attrs[ATTR_BITS]), grid_kind)  # ValueError for bits outside 1..8 or an unknown grid
        spec = cls(tuple(int(d) for d in attrs[ATTR_SHAPE]), grid, int(attrs[ATTR_DTYPE]))
        if not spec.shape or min(spec.shape) < 1:
            raise ValueError(f"{OP_TYPE}: shape {list(spec.shape)} is not a weight shape")
        if spec.dtype not in DTYPES:
            raise ValueError(f"{OP_TYPE}: dtype {spec.dtype} is not one of {sorted(DTYPES)} ({', '.join(DTYPES.values())})")
        given = (int(attrs[ATTR_LEVELS]), int(attrs[ATTR_PER_FIELD]), int(attrs[ATTR_FIELD_BITS]))
        p = spec.packing
        if given != (p.levels, p.per_field, p.field_bits):
            raise ValueError(f"{OP_TYPE}: packing {given} does not match a {grid.bits}-bit {grid.kind} grid ({p.name})")
        return spec

    def codes_bytes(self) -> int:
        return self.packing.nbytes(self.shape)


def reference_dequant(codes: np.ndarray, scale: np.ndarray, spec: DequantSpec) -> np.ndarray:
    """The op's output in float32 (the reference every implementation is compared with)."""
    if scale.shape != (spec.shape[0],):
        raise ValueError(f"{OP_TYPE}: {scale.size} scales for {spec.shape[0]} output channels")
    return QuantizedLayer(OP_TYPE, spec.shape, spec.grid, np.asarray(codes), scale.astype(np.float32)).dequantize()
