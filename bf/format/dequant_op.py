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
# The TensorRT plugin's namespace: TensorRT's ONNX parser finds plugins by op type, plugin_version
# and plugin_namespace attributes (defaults "1" and ""), not by the node's domain.
PLUGIN_NAMESPACE = ""

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


# The C++ side (plugins_trt) includes a header generated from the definitions above, so the
# op name, fields and packing table exist once. tests/test_plugin_contract.py keeps it current;
# regenerate with: python -m bf.format.dequant_op > plugins_trt/include/bf_op_contract.h
ABI_VERSION = 2  # of the C functions in plugins_trt/include/bf_decode.h; bump when they change


def c_header() -> str:
    from bf.format.packing import BALANCED_FIELDS, TAIL_ALIGN

    rows = "\n".join(f"    {{{levels}, {k}, {f}}}," for levels, (k, f) in sorted(BALANCED_FIELDS.items()))
    fields = "\n".join(f'#define BF_FIELD_{a.upper()} "{a}"' for a in ATTRIBUTES)
    dtypes = "\n".join(f"#define BF_DTYPE_{name.upper()} {num}" for num, name in DTYPES.items())
    return f"""/* Generated by `python -m bf.format.dequant_op` from bf/format/dequant_op.py and
 * bf/format/packing.py; do not edit (tests/test_plugin_contract.py checks it is current). */
#ifndef BF_OP_CONTRACT_H
#define BF_OP_CONTRACT_H

#define BF_OP_DOMAIN "{DOMAIN}"
#define BF_OP_NAME "{OP_TYPE}"
#define BF_OP_VERSION "{OP_VERSION}"
#define BF_PLUGIN_NAMESPACE "{PLUGIN_NAMESPACE}"
#define BF_ABI_VERSION {ABI_VERSION}
#define BF_NUM_FIELDS {len(ATTRIBUTES)}
{fields}

/* ONNX element types of the op's output and scale. */
{dtypes}

/* Packed buffer: rows of fields, then zero bytes to a multiple of BF_TAIL_ALIGN plus BF_TAIL_ALIGN. */
#define BF_TAIL_ALIGN {TAIL_ALIGN}
#define BF_MAX_BITS 8

/* Balanced grids: {{levels L, codes per field K, field bits F}}; plain grids use {{2^b, 1, b}}. */
#define BF_NUM_BALANCED {len(BALANCED_FIELDS)}
#define BF_BALANCED_FIELDS {{ \\
{rows.replace(chr(10), " " + chr(92) + chr(10))} \\
}}

#endif /* BF_OP_CONTRACT_H */
"""


if __name__ == "__main__":
    print(c_header(), end="")
