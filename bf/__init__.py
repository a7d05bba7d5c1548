"""bf: the BitsFusion toolchain (1.99-bit UNet quantization, export and runtime).

Sub-packages: ``bf.format`` (packed checkpoint and quantization grid, shared by all
stages), ``bf.models`` (model directories and architectures), and the stages
``bf.trainer``, ``bf.export`` and ``bf.runtime``, which never import each other.
"""

__version__ = "0.1.0"
