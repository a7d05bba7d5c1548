"""``onnx-std``: every ``bitsfusion::LowBitDequant`` node rewritten as standard ONNX operators.

The rewrite decodes the packed bytes with integer operators only, following
docs/FORMAT.md section 4 literally, so any ONNX runtime runs the graph without plugins and
the file still stores packed codes:

    rows  = Reshape(Slice(codes, 0, O*R), [O, R]), zero-padded by 4 bytes per row
    bytes = Gather(rows, (j*F div 8) + [0..4])           the <= 5 bytes holding field j
    word  = sum_k bytes[k] * 256^k                          little-endian, < 2^40
    field = (word >> (j*F mod 8)) mod 2^F
    code  = (field div L^t) mod L,  t = 0..K-1            first code least significant
    W     = scale[o] * (code + qmin), reshaped to the weight's shape

All index arithmetic is computed in the graph from a handful of scalars (no per-weight
constants). A runtime with constant folding (ONNX Runtime's default) decodes each weight
once when the session is created.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bf.format.dequant_op import DOMAIN, OP_TYPE, DequantSpec
from bf.format.packing import rows_and_len

BYTES_PER_FIELD_MAX = 5  # a field of <= 32 bits starting at any bit offset lies in 5 bytes


def node_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


SHARED_PREFIX = "bf_dequant"
LOWERED_PREFIX = "dq"  # node names of lowered op k start with dq<k>/
QDQ_PREFIX = "qdq"  # onnx-qdq: weight k is qdq<k>/weight (DequantizeLinear) or qdq<k>/weight_float (257 levels)


class _Builder:
    """Nodes and small constants of one lowered op, with names unique to it.

    Constants that are the same for every op are created once per graph (``shared``)."""

    def __init__(self, prefix: str, shared: dict[str, onnx.TensorProto]):
        self.prefix, self.nodes, self.inits, self.shared = prefix, [], [], shared

    def const(self, name: str, value) -> str:
        full = f"{self.prefix}/{name}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def common(self, name: str, value) -> str:
        full = f"{SHARED_PREFIX}/{name}"
        if full not in self.shared:
            self.shared[full] = numpy_helper.from_array(np.asarray(value), full)
        return full

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{self.prefix}/{name}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def lower_dequant(node: onnx.NodeProto, prefix: str, shared: dict) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Standard nodes (and their own constants) computing ``node``'s output from the same inputs;
    constants common to every op are added to ``shared``."""
    spec = DequantSpec.from_attributes(node_attributes(node))
    p = spec.packing
    rows, row_len = rows_and_len(spec.shape)
    row_bytes, nfields = p.row_bytes(row_len), p.fields_per_row(row_len)
    codes, scale = node.input
    b = _Builder(prefix, shared)
    i64 = np.int64

    body = b.op("Slice", [codes, b.common("zero", np.array([0], i64)), b.const("body_end", np.array([rows * row_bytes], i64))], "body")
    body = b.op("Reshape", [body, b.const("rows_shape", np.array([rows, row_bytes], i64))], "rows")
    body = b.op("Cast", [body], "rows_i64", to=TensorProto.INT64)
    pads = b.common("pads", np.array([0, 0, 0, BYTES_PER_FIELD_MAX - 1], i64))
    padded = b.op("Pad", [body, pads], "padded")  # fields near the row's end read zeros past it

    j = b.op("Range", [b.common("j0", np.array(0, i64)), b.const("nf", np.array(nfields, i64)), b.common("one", np.array(1, i64))], "j")
    bit = b.op("Mul", [j, b.const("F", np.array(p.field_bits, i64))], "bit")
    first = b.op("Div", [bit, b.common("eight", np.array(8, i64))], "first_byte")
    shift = b.op("Mod", [bit, b.common("eight", np.array(8, i64))], "shift")
    idx = b.op(
        "Add",
        [
            b.op("Unsqueeze", [first, b.common("ax1", np.array([1], i64))], "first_col"),
            b.common("k", np.arange(BYTES_PER_FIELD_MAX, dtype=i64)[None, :]),
        ],
        "byte_index",
    )
    gathered = b.op("Gather", [padded, idx], "bytes", axis=1)  # (O, nf, 5)
    weights = b.common("byte_weights", (256 ** np.arange(BYTES_PER_FIELD_MAX, dtype=i64)).astype(i64))
    word = b.op("ReduceSum", [b.op("Mul", [gathered, weights], "weighted"), b.common("ax2", np.array([2], i64))], "word", keepdims=0)
    word = b.op("Cast", [word], "word_u64", to=TensorProto.UINT64)
    shifted = b.op("BitShift", [word, b.op("Cast", [shift], "shift_u64", to=TensorProto.UINT64)], "shifted", direction="RIGHT")
    shifted = b.op("Cast", [shifted], "shifted_i64", to=TensorProto.INT64)
    field = b.op("Mod", [shifted, b.const("field_mod", np.array(2**p.field_bits, i64))], "field")

    powers = b.const("radix_powers", np.array([p.levels**t for t in range(p.per_field)], i64))
    digits = b.op("Div", [b.op("Unsqueeze", [field, b.common("ax2u", np.array([2], i64))], "field3"), powers], "shifted_digits")
    digits = b.op("Mod", [digits, b.const("radix", np.array(p.levels, i64))], "codes3")
    flat = b.op("Reshape", [digits, b.const("flat_shape", np.array([rows, nfields * p.per_field], i64))], "codes2")
    flat = b.op(
        "Slice",
        [flat, b.common("s0", np.array([0], i64)), b.const("s_end", np.array([row_len], i64)), b.common("s_ax", np.array([1], i64))],
        "codes",
    )
    levels = b.op("Add", [flat, b.const("qmin", np.array(spec.grid.qmin, i64))], "levels")
    levels = b.op("Cast", [levels], "levels_f32", to=TensorProto.FLOAT)
    scale32 = b.op("Cast", [scale], "scale_f32", to=TensorProto.FLOAT)
    scale_col = b.op("Unsqueeze", [scale32, b.common("ax1s", np.array([1], i64))], "scale_col")
    weight = b.op("Mul", [levels, scale_col], "weight2")
    weight = b.op("Reshape", [weight, b.const("shape", np.array(spec.shape, i64))], "weight_f32")
    b.nodes.append(helper.make_node("Cast", [weight], [node.output[0]], name=f"{prefix}/weight", to=spec.dtype))
    return b.nodes, b.inits


def lower_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every dequant op lowered; the ``bitsfusion`` opset is dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, shared, k = [], {}, 0
    for node in out.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            new_nodes, inits = lower_dequant(node, f"{LOWERED_PREFIX}{k}", shared)
            k += 1
            nodes.extend(new_nodes)
            out.graph.initializer.extend(inits)
        else:
            nodes.append(node)
    out.graph.initializer.extend(shared.values())
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    keep = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def count_dequant_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)


def dequant_inputs(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Names of the packed-codes and scale initializers of every dequant op, lowered or not.

    A lowered op reads its codes in its ``<prefix>/body`` Slice and its scales in its
    ``<prefix>/scale_f32`` Cast (names given by ``lower_dequant``); a qdq weight's integer
    levels (or float weight) count as its codes."""
    codes, scales = set(), set()
    for n in model.graph.node:
        if (n.domain == DOMAIN and n.op_type == OP_TYPE) or (n.op_type == "DequantizeLinear" and n.name.startswith(QDQ_PREFIX)):
            codes.add(n.input[0])
            scales.add(n.input[1])
        elif n.name.startswith(QDQ_PREFIX) and n.name.endswith("/weight_float"):
            codes.add(n.input[0])
        elif n.name.startswith(LOWERED_PREFIX):
            if n.name.endswith("/body"):
                codes.add(n.input[0])
            elif n.name.endswith("/scale_f32"):
                scales.add(n.input[0])
    return codes, scales
