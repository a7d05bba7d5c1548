"""A float16 copy of an exported float32 graph, for strongly typed TensorRT builds.

TensorRT for RTX (and TensorRT's strongly typed networks) take every tensor's precision from
the graph: an fp16 engine needs an fp16 graph. The exported graphs are float32 (they are
checked against PyTorch in float32), so the engine build converts a copy:

- float32 constants (initializers, Constant and ConstantOfShape values) become float16, and so
  do ``Cast`` nodes to float32; ``DequantizeLinear`` and ``LowBitDequant`` scales too, and the
  latter's output type, so quantized weights come out in float16;
- graph inputs and outputs stay float32, with a Cast at each, so every engine has the same
  interface whatever its precision;
- tensors that ONNX requires to be float32 stay so: Resize's ``roi`` and ``scales``.

The float16 rounding is the engine's precision, the same a float16 PyTorch model has.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bf.format.dequant_op import ATTR_DTYPE, DOMAIN, OP_TYPE

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
KEEP_FLOAT_INPUTS = {"Resize": (1, 2)}  # op type -> input positions that must stay float32


def _to_half(t: onnx.TensorProto) -> onnx.TensorProto:
    a = numpy_helper.to_array(t)
    with np.errstate(over="ignore"):  # float32 extremes (attention masks' -3.4e38) become -inf, as in a float16 model
        return numpy_helper.from_array(a.astype(np.float16), t.name)


def to_fp16(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """A float16 copy of ``model`` with float32 inputs and outputs (see the module's docstring);
    ``copy=False`` converts ``model`` itself (a full-size graph need not be held twice)."""
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    g = out.graph
    keep = {n.input[i] for n in g.node for i in KEEP_FLOAT_INPUTS.get(n.op_type, ()) if i < len(n.input) and n.input[i]}
    graph_inputs = {vi.name for vi in g.input}
    inits = []
    for t in g.initializer:
        inits.append(_to_half(t) if t.data_type == FLOAT and t.name not in keep else t)
    del g.initializer[:]
    g.initializer.extend(inits)
    for n in g.node:
        if n.op_type == "Cast" and n.output[0] not in keep:
            for a in n.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = HALF
        elif n.domain == DOMAIN and n.op_type == OP_TYPE:
            for a in n.attribute:
                if a.name == ATTR_DTYPE and a.i == FLOAT:
                    a.i = HALF
        elif n.op_type in ("Constant", "ConstantOfShape") and n.output[0] not in keep:
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_to_half(a.t))
    # Float inputs: a Cast to float16 right after each; float outputs: a Cast back before each.
    renamed_in = {vi.name: f"{vi.name}__fp16" for vi in g.input if vi.type.tensor_type.elem_type == FLOAT}
    # An output that is a graph input is passed through as it is; every other float output gets a Cast back.
    renamed_out = {vi.name: f"{vi.name}__fp16" for vi in g.output if vi.type.tensor_type.elem_type == FLOAT and vi.name not in graph_inputs}
    for t in g.initializer:  # an output that is a constant: the constant is renamed like a node's output
        if t.name in renamed_out:
            t.name = renamed_out[t.name]
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in renamed_in:
                n.input[i] = renamed_in[name]
            elif name in renamed_out:  # a graph output read inside the graph too
                n.input[i] = renamed_out[name]
        for i, name in enumerate(n.output):
            if name in renamed_out:
                n.output[i] = renamed_out[name]
    casts_in = [helper.make_node("Cast", [name], [half], name=f"{name}/to_fp16", to=HALF) for name, half in renamed_in.items()]
    casts_out = [helper.make_node("Cast", [half], [name], name=f"{name}/to_fp32", to=FLOAT) for name, half in renamed_out.items()]
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # float32 types of inner tensors no longer hold
    return out
