"""The quantization grid: which integer levels a b-bit layer may take.

A weight row (one output channel) is stored as integer *levels* ``q`` and one scale
``s``; the dequantized weight is ``s * q``. The *code* of a level is ``q - qmin``,
an integer in ``[0, levels)``, which is what the packing stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GRID_KINDS = ("balanced", "plain")
MIN_BITS, MAX_BITS = 1, 8


@dataclass(frozen=True)
class Grid:
    """``balanced``: levels -2^(b-1) .. +2^(b-1) (2^b + 1 levels, symmetric, BitsFusion).

    ``plain``: levels -2^(b-1) .. 2^(b-1) - 1 (2^b levels, the LSQ baseline).
    """

    bits: int
    kind: str = "balanced"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.kind not in GRID_KINDS:
            raise ValueError(f"grid must be one of {', '.join(GRID_KINDS)}, got {self.kind!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        half = 2 ** (self.bits - 1)
        return half if self.kind == "balanced" else half - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    @property
    def paper_bits(self) -> float:
        """Bits per weight as the paper counts them: log2(number of levels)."""
        return math.log2(self.levels)

    def to_json(self) -> dict:
        return {"bits": self.bits, "kind": self.kind}

    @classmethod
    def from_json(cls, obj: dict) -> Grid:
        return cls(bits=int(obj["bits"]), kind=str(obj["kind"]))
