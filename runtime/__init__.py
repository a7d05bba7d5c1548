"""bf.runtime: the lean deployment runtime.

Imports ``bf.format``; never imports ``bf.trainer`` or ``bf.export``, and never
imports torch, diffusers or transformers on its ONNX Runtime and TensorRT paths.
``bf infer`` runs ``pipeline.generate`` on a backend: ``backend_ort`` (ONNX Runtime),
``backend_trt`` (TensorRT engines, CUDA through ctypes) or ``backend_torch`` (PyTorch on a GPU,
which imports torch and diffusers).
"""
