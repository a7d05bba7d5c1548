"""bf.runtime: the lean deployment runtime (issue 7, in progress).

Imports ``bf.format``; never imports ``bf.trainer`` or ``bf.export``, and never
imports torch, diffusers or transformers on its ONNX Runtime and TensorRT paths.
So far: ``schedulers`` (PNDM, DDIM, DPM-Solver++ 2M in NumPy, checked against diffusers) and
``tokenizer`` (CLIP BPE in plain Python, checked against transformers).
There is no ``bf infer`` command yet.
"""
