"""``--check``: the exported graphs run by ONNX Runtime against the PyTorch modules they came from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bf.errors import BfError

PSNR_FLOOR_DB = {"float32": 40.0, "float16": 30.0}


def psnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio with the reference's value range as the peak (inf when equal)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise BfError(f"output shape {out.shape} differs from the reference's {ref.shape}")
    if not np.isfinite(out).all():
        return float("-inf")
    mse = float(np.mean((out - ref) ** 2))
    peak = float(ref.max() - ref.min()) or 1.0
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def ort_session(model: onnx.ModelProto | str, providers: list[str] | None = None):
    import onnxruntime as ort

    from bf.ort_options import session_options

    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, session_options(ort), providers=providers or ["CPUExecutionProvider"])


@dataclass
class GraphCheck:
    graph: str
    psnr_db: float
    floor_db: float

    @property
    def ok(self) -> bool:
        return bool(self.psnr_db >= self.floor_db)

    def to_json(self) -> dict:
        return {"graph": self.graph, "psnr_db": round(self.psnr_db, 2) if np.isfinite(self.psnr_db) else str(self.psnr_db),
                "floor_db": self.floor_db, "ok": self.ok}  # fmt: skip


def check_graph(name: str, model: onnx.ModelProto | str, inputs: dict[str, np.ndarray], reference, dtype: str) -> GraphCheck:
    """``reference``: the first output's array, or a list of every output's; the check's PSNR is the worst output's."""
    refs = reference if isinstance(reference, list | tuple) else [reference]
    outs = ort_session(model).run(None, inputs)
    return GraphCheck(name, min(float(psnr_db(o, r)) for o, r in zip(outs, refs, strict=False)), PSNR_FLOOR_DB[dtype])


def raise_on_failures(checks: list[GraphCheck]) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        worst = ", ".join(f"{c.graph} {c.psnr_db:.1f} dB (floor {c.floor_db:.0f} dB, {c.floor_db - c.psnr_db:.1f} dB short)" for c in bad)
        raise BfError(f"export check failed: ONNX Runtime differs from PyTorch: {worst}; nothing was written")
