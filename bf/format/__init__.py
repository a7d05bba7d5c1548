"""The packed low-bit checkpoint and the quantization grid, shared by every stage.

NumPy and safetensors only: the deployment runtime imports this without torch.
"""

from bf.format.checkpoint import FORMAT_VERSION, Bundle, Checkpoint, QuantizedLayer, read_header
from bf.format.grid import GRID_KINDS, Grid
from bf.format.packing import Packing, pack_codes, unpack_codes
from bf.format.summary import summarize
from bf.format.unet_layers import (
    EDGE_BITS,
    EDGE_LAYERS,
    candidate_layers,
    has_added_embedding,
    is_time_layer,
    quantizable_layers,
)

__all__ = [
    "EDGE_BITS",
    "EDGE_LAYERS",
    "FORMAT_VERSION",
    "GRID_KINDS",
    "Bundle",
    "Checkpoint",
    "Grid",
    "Packing",
    "QuantizedLayer",
    "candidate_layers",
    "has_added_embedding",
    "is_time_layer",
    "pack_codes",
    "quantizable_layers",
    "read_header",
    "summarize",
    "unpack_codes",
]
