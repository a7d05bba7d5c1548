"""bf.export: ONNX graphs and TensorRT engines from a packed checkpoint (issue 5).

Imports ``bf.format``; never imports ``bf.trainer`` or ``bf.runtime``. Empty until
the export issue lands: there is no ``bf export`` command yet.
"""
