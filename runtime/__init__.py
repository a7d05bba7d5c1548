"""bf.runtime: the lean deployment runtime (issue 7).

Imports ``bf.format``; never imports ``bf.trainer`` or ``bf.export``, and never
imports torch, diffusers or transformers on its ONNX Runtime and TensorRT paths.
Empty until the runtime issue lands: there is no ``bf infer`` command yet.
"""
