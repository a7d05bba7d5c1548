"""``onnx-qdq``: every ``bitsfusion::LowBitDequant`` node rewritten as a standard ``DequantizeLinear``.

Each quantized weight becomes one integer constant of its levels and one ``DequantizeLinear``
with a float32 scale per output channel, the form TensorRT (and TensorRT for RTX) turns into
engines that keep the weights in low precision, and that every ONNX runtime runs:

- levels in [-8, 7] (balanced 1-3 bit, plain 1-4 bit): an INT4 constant (ONNX packs two a byte);
- levels in [-128, 127] (balanced 4-7 bit, plain 5-8 bit): an INT8 constant;
- balanced 8 bit (levels -128..+128, 257 of them): no 8-bit integer type holds +128, and
  TensorRT's dequantization has no zero point, so the weight is stored dequantized, as a
  float32 constant (exact: every ``scale * level`` of such a layer is a float32 number).

A linear layer's weight reaches its MatMul through a Transpose in the traced graph; the
constant is stored transposed instead (quantization axis 1), so the DequantizeLinear feeds the
MatMul directly, as TensorRT's weight-only quantization expects. ``DequantizeLinear`` computes
``level * scale`` in float32, which is what the format's reference decoder computes: the
lowered weights equal the .bfq's bit for bit.

INT4 needs opset 21 and IR version 10; the lowered graph declares both.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from bf.errors import BfError
from bf.export.lowering import QDQ_PREFIX, node_attributes
from bf.format.checkpoint import QuantizedLayer
from bf.format.dequant_op import DOMAIN, OP_TYPE, DequantSpec
from bf.format.grid import Grid

QDQ_OPSET = 21  # the first opset with INT4 DequantizeLinear
QDQ_IR_VERSION = 10  # the first IR version with INT4; TensorRT 10 reads up to 10

INT4_RANGE = (-8, 7)
INT8_RANGE = (-128, 127)


def qdq_form(grid: Grid) -> str:
    """How a layer of ``grid`` is stored: ``int4``, ``int8`` or ``float`` (see the module's docstring)."""
    if INT4_RANGE[0] <= grid.qmin and grid.qmax <= INT4_RANGE[1]:
        return "int4"
    if INT8_RANGE[0] <= grid.qmin and grid.qmax <= INT8_RANGE[1]:
        return "int8"
    return "float"


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _transpose_into_matmul(node: onnx.NodeProto, consumers: dict) -> onnx.NodeProto | None:
    """The Transpose(perm 1,0) between a 2-D weight and its only MatMul, when that is the pattern."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Transpose":
        return None
    t = users[0]
    perm = node_attributes(t).get("perm")
    after = consumers.get(t.output[0], [])
    if list(perm or []) != [1, 0] or not after or any(n.op_type != "MatMul" or n.input[1] != t.output[0] for n in after):
        return None
    return t


def _layer(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> QuantizedLayer:
    try:
        spec = DequantSpec.from_attributes(node_attributes(node))
    except ValueError as e:
        raise BfError(f"{node.name}: cannot lower to DequantizeLinear: {e}") from None
    codes, scale = (inits.get(name) for name in node.input)
    if codes is None or scale is None:
        raise BfError(f"{node.name}: the packed codes and scales must be constants of the graph to lower it to DequantizeLinear")
    return QuantizedLayer(node.name, spec.shape, spec.grid, numpy_helper.to_array(codes), numpy_helper.to_array(scale).astype(np.float32))


def lower_graph_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every dequant op as ``DequantizeLinear`` over INT4/INT8 constants
    (float32 for 257-level layers); the ``bitsfusion`` opset is dropped, opset and IR version raised."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits, consumers = _initializers(out), _consumers(out)
    replaced: set[str] = set()  # initializers of the custom ops, no longer used
    dropped: set[int] = set()  # ids of folded Transpose nodes
    nodes, new_inits = [], []
    k = 0
    for node in out.graph.node:
        if id(node) in dropped:
            continue
        if not (node.domain == DOMAIN and node.op_type == OP_TYPE):
            nodes.append(node)
            continue
        layer = _layer(node, inits)
        replaced.update(node.input)
        prefix = f"{QDQ_PREFIX}{k}"
        k += 1
        levels, axis, output = layer.levels(), 0, node.output[0]
        transpose = _transpose_into_matmul(node, consumers) if levels.ndim == 2 else None
        if transpose is not None:
            levels, axis, output = levels.T, 1, transpose.output[0]
            dropped.add(id(transpose))
        form = qdq_form(layer.grid)
        if form == "float":
            w = layer.dequantize()
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T if axis else w), f"{prefix}/weight"))
            nodes.append(helper.make_node("Identity", [f"{prefix}/weight"], [output], name=f"{prefix}/weight_float"))
            continue
        dtype = ml_dtypes.int4 if form == "int4" else np.int8
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(levels).astype(dtype), f"{prefix}/levels"))
        new_inits.append(numpy_helper.from_array(layer.scale.astype(np.float32), f"{prefix}/scale"))
        nodes.append(
            helper.make_node("DequantizeLinear", [f"{prefix}/levels", f"{prefix}/scale"], [output], name=f"{prefix}/weight", axis=axis)
        )
    used = {i for n in nodes for i in n.input}
    kept = [t for t in out.graph.initializer if t.name not in replaced or t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    keep = [o for o in out.opset_import if o.domain != DOMAIN]
    for o in keep:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, QDQ_OPSET)
    del out.opset_import[:]
    out.opset_import.extend(keep)
    out.ir_version = max(out.ir_version, QDQ_IR_VERSION)
    return out


def qdq_nodes(model: onnx.ModelProto) -> int:
    """How many quantized weights a lowered graph holds (DequantizeLinear or float form)."""
    return sum(1 for n in model.graph.node if n.name.startswith(QDQ_PREFIX) and n.name.endswith(("/weight", "/weight_float")))
