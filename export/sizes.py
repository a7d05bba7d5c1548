"""Where the bytes of an exported UNet graph go."""

from __future__ import annotations

import onnx

from bf.export.lowering import dequant_inputs

TIME_TABLE_MARKS = ("time_emb_proj.table", "time_embedding.table")  # SD-v1.5's per-ResBlock tables, SDXL's one


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()


def unet_breakdown(model: onnx.ModelProto, file_bytes: int) -> dict:
    """Bytes by kind: packed codes, scales, time table, other tensors (biases, norms,
    constants), and the graph itself (nodes, names, protobuf framing)."""
    codes, scales = dequant_inputs(model)
    out = {"packed_codes": 0, "scales": 0, "time_table": 0, "other_tensors": 0}
    for t in model.graph.initializer:
        if t.name in codes:
            key = "packed_codes"
        elif t.name in scales:
            key = "scales"
        else:
            key = "time_table" if any(m in t.name for m in TIME_TABLE_MARKS) else "other_tensors"
        out[key] += _tensor_bytes(t)
    out["graph"] = file_bytes - sum(out.values())
    out["total"] = file_bytes
    return out
