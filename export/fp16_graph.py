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

# SDXL's micro-conditioning (time_ids: image sizes up to thousands) goes through a sinusoidal embedding in the graph;
# in float16 its phases are off by up to 0.5 rad at 1024 (one float16 step there is 1.0). These inputs, and the
# element-wise ops that follow them up to the first layer, stay float32, as diffusers computes them.
FLOAT32_ISLAND_INPUTS = ("time_ids",)
_ISLAND_DATA = {  # op type -> its float data inputs (None: all); other inputs are shapes, axes, indices
    **dict.fromkeys(("Mul", "Add", "Sub", "Div", "Concat"), None),
    **dict.fromkeys(("Sin", "Cos", "Exp", "Neg", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"), (0,)),
    **dict.fromkeys(("Expand", "Transpose", "Slice", "Gather", "Cast"), (0,)),
}


def _data_inputs(n: onnx.NodeProto):
    """The input positions of an island op that carry float data (not shapes, axes or indices)."""
    return _ISLAND_DATA[n.op_type] or range(len(n.input))


def _float32_island(g: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """Names of the nodes computed from FLOAT32_ISLAND_INPUTS by element-wise and shape ops (in graph order, which
    ONNX makes topological), and of the tensors they make."""
    tensors = {vi.name for vi in g.input if vi.name in FLOAT32_ISLAND_INPUTS}
    nodes = set()
    for n in g.node:
        if n.op_type not in _ISLAND_DATA or n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "Cast" and not any(a.name == "to" and a.i == FLOAT for a in n.attribute):
            continue
        positions = _data_inputs(n)
        if any(i < len(n.input) and n.input[i] in tensors for i in positions):
            nodes.add(n.name)
            tensors.update(n.output)
    return nodes, tensors


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
    for i, n in enumerate(g.node):  # every node named: the island's casts are placed by name
        n.name = n.name or f"bf_node_{i}"
    keep = {n.input[i] for n in g.node for i in KEEP_FLOAT_INPUTS.get(n.op_type, ()) if i < len(n.input) and n.input[i]}
    graph_inputs = {vi.name for vi in g.input}
    island, island_tensors = _float32_island(g)
    in_island = [n for n in g.node if n.name in island]
    consumers: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type in ("Constant", "ConstantOfShape") for o in n.output}
    for n in in_island:  # the island's constants stay float32 where only the island reads them
        for name in n.input:
            if name in constants and all(c.name in island for c in consumers[name]):
                keep.add(name)
    keep |= {o for n in in_island for o in n.output}  # (its Casts stay casts to float32)
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
    # Float inputs: a Cast to float16 right after each (the island's: float32 for it, a Cast for any other reader);
    # float outputs: a Cast back before each.
    renamed_in = {vi.name: f"{vi.name}__fp16" for vi in g.input if vi.type.tensor_type.elem_type == FLOAT}
    island_casts = _island_boundary(g, island, island_tensors, constants, keep, renamed_in)
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
    nodes = casts_in + _with_casts(list(g.node), island_casts) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # float32 types of inner tensors no longer hold
    return out


def _island_boundary(g, island: set[str], island_tensors: set[str], constants: set[str], keep: set[str], renamed_in: dict) -> dict:
    """Rewire the float32 island's edges, in place: its graph inputs are read as they are (float32); a float16 tensor
    it reads gets a Cast to float32, and a tensor of it a float16 node reads a Cast to float16. The Casts to insert:
    node name -> [(Cast node, input position)]."""
    casts: dict[str, list] = {}
    for name in FLOAT32_ISLAND_INPUTS:
        if name in island_tensors:
            renamed_in.pop(name, None)
    produced = {o for m in g.node for o in m.output}
    for n in g.node:
        key = n.name
        inside = key in island
        positions = _data_inputs(n) if inside else range(len(n.input))
        for i in positions:
            if i >= len(n.input) or not n.input[i]:
                continue
            name = n.input[i]
            if inside and name not in island_tensors and name not in keep:
                if name in constants or name in produced or name in renamed_in:
                    cast = helper.make_node("Cast", [renamed_in.get(name, name)], [f"{name}__to_fp32_{key}"], name=f"{name}/to_fp32/{key}",
                                            to=FLOAT)  # fmt: skip
                    casts.setdefault(key, []).append(cast)
                    n.input[i] = cast.output[0]
            elif not inside and name in island_tensors:
                cast = helper.make_node("Cast", [name], [f"{name}__to_fp16_{key}"], name=f"{name}/to_fp16/{key}", to=HALF)
                casts.setdefault(key, []).append(cast)
                n.input[i] = cast.output[0]
    return casts


def _with_casts(nodes: list, casts: dict) -> list:
    out = []
    for n in nodes:
        out += casts.get(n.name, [])
        out.append(n)
    return out
