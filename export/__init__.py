"""bf.export: ONNX graphs and TensorRT engines from a packed checkpoint (``bf export``).

Imports ``bf.format`` and the shared ``bf`` modules; never imports ``bf.trainer`` or ``bf.runtime``.
"""
