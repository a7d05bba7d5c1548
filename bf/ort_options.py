"""ONNX Runtime session options every bf session uses (the export's check and the ort backend)."""

from __future__ import annotations

# ONNX Runtime fuses DequantizeLinear(INT4) -> MatMul into MatMulNBits, which by default quantizes
# the activations to int8 (accuracy level 4): 1e-3 relative error on the UNet. Level 1 computes
# in float32, so a qdq graph gives what its dequantized weights say, like the other graph forms.
MATMULNBITS_ACCURACY = ("session.qdq_matmulnbits_accuracy_level", "1")


def session_options(ort):
    options = ort.SessionOptions()
    options.add_session_config_entry(*MATMULNBITS_ACCURACY)
    return options
