"""Where the bytes of an exported UNet graph go."""

from __future__ import annotations

import onnx

from bf.format.dequant_op import DOMAIN, OP_TYPE

TIME_TABLE_MARK = "time_emb_proj.table"


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()


def unet_breakdown(model: onnx.ModelProto, file_bytes: int) -> dict:
    """Bytes by kind: packed codes, scales, time table, other tensors (biases, norms,
    constants), and the graph itself (nodes, names, protobuf framing)."""
    codes, scales = set(), set()
    for n in model.graph.node:
        if n.domain == DOMAIN and n.op_type == OP_TYPE:
            codes.add(n.input[0])
            scales.add(n.input[1])
    out = {"packed_codes": 0, "scales": 0, "time_table": 0, "other_tensors": 0}
    for t in model.graph.initializer:
        # onnx-std graphs have no dequant nodes left: their codes are the uint8 tensors, their scales the exporter's names
        if t.name in codes or t.data_type == onnx.TensorProto.UINT8:
            key = "packed_codes"
        elif t.name in scales or t.name.endswith("weight_op.scale"):
            key = "scales"
        else:
            key = "time_table" if TIME_TABLE_MARK in t.name else "other_tensors"
        out[key] += _tensor_bytes(t)
    out["graph"] = file_bytes - sum(out.values())
    out["total"] = file_bytes
    return out
