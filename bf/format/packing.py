"""Bit packing of quantization codes (see docs/FORMAT.md, "Packed codes").

Each output channel (row) is a little-endian bit stream of fixed-size *fields*;
a field of ``F`` bits holds ``K`` codes in base ``L`` (the number of levels), the
first code least significant. Rows start on byte boundaries; the buffer ends with
4 to 7 zero bytes so a decoder may always load the two aligned 32-bit words that
contain any field. Every field is decodable on its own from its bit offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bf.errors import FormatError
from bf.format.grid import Grid

# Codes per field (K) and field width in bits (F) for each number of levels L.
# Chosen for the smallest F/K with F <= 32 (L^K <= 2^F), except that 3 levels use
# 5 codes per byte (1.6 bits, byte fields, a 243-entry table) instead of 17 per
# 27 bits (1.588 bits). Plain grids (L = 2^b) store one code per b-bit field.
BALANCED_FIELDS: dict[int, tuple[int, int]] = {
    3: (5, 8),  # 1 bit:  1.600 bits/weight  (3^5  = 243)
    5: (3, 7),  # 2 bits: 2.333              (5^3  = 125)
    9: (5, 16),  # 3 bits: 3.200             (9^5  = 59049)
    17: (7, 29),  # 4 bits: 4.143            (17^7 = 410338673)
    33: (6, 31),  # 5 bits: 5.167            (33^6 = 1291467969)
    65: (5, 31),  # 6 bits: 6.200            (65^5 = 1160290625)
    129: (4, 29),  # 7 bits: 7.250           (129^4 = 276922881)
    257: (3, 25),  # 8 bits: 8.333           (257^3 = 16974593)
}
TAIL_ALIGN = 4  # the buffer is padded to a multiple of 4 bytes, then 4 more bytes
# Rows are packed and unpacked in blocks of about this many fields: the temporaries
# take under 100 bytes a field, so a block stays below ~400 MB however large the layer.
BLOCK_FIELDS = 2**22


@dataclass(frozen=True)
class Packing:
    """How codes of one layer are laid out in bytes."""

    levels: int  # L: codes are 0 .. L-1
    per_field: int  # K: codes per field
    field_bits: int  # F: bits per field

    def __post_init__(self) -> None:
        # Bounds first: levels**per_field of an unchecked header could take hours.
        if not (2 <= self.levels <= 65536 and 1 <= self.per_field <= 32 and 1 <= self.field_bits <= 32):
            raise ValueError(f"invalid packing {self}")
        if self.levels**self.per_field > 2**self.field_bits:
            raise ValueError(f"{self.per_field} codes of base {self.levels} do not fit {self.field_bits} bits")

    @classmethod
    def for_grid(cls, grid: Grid) -> Packing:
        if grid.kind == "plain":
            return cls(levels=grid.levels, per_field=1, field_bits=grid.bits)
        k, f = BALANCED_FIELDS[grid.levels]
        return cls(levels=grid.levels, per_field=k, field_bits=f)

    @property
    def name(self) -> str:
        return f"radix{self.levels}-k{self.per_field}-f{self.field_bits}"

    @property
    def bits_per_code(self) -> float:
        return self.field_bits / self.per_field

    def fields_per_row(self, row_len: int) -> int:
        return -(-row_len // self.per_field)

    def row_bytes(self, row_len: int) -> int:
        return -(-self.fields_per_row(row_len) * self.field_bits // 8)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Size of the packed buffer for a weight of this shape, tail padding included."""
        rows, row_len = rows_and_len(shape)
        body = rows * self.row_bytes(row_len)
        return -(-body // TAIL_ALIGN) * TAIL_ALIGN + TAIL_ALIGN

    def to_json(self) -> dict:
        return {"levels": self.levels, "per_field": self.per_field, "field_bits": self.field_bits}

    @classmethod
    def from_json(cls, obj: dict) -> Packing:
        return cls(levels=int(obj["levels"]), per_field=int(obj["per_field"]), field_bits=int(obj["field_bits"]))


def rows_and_len(shape: tuple[int, ...]) -> tuple[int, int]:
    """A weight of shape (out, ...) is packed as ``out`` rows of prod(...) codes."""
    if len(shape) < 1 or any(int(d) < 1 for d in shape):
        raise ValueError(f"cannot pack a weight of shape {tuple(shape)}")
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def _row_blocks(rows: int, fields_per_row: int) -> list[slice]:
    step = max(1, BLOCK_FIELDS // fields_per_row)
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def pack_codes(codes: np.ndarray, packing: Packing) -> np.ndarray:
    """Pack integer codes of shape (out, ...) with values in [0, L) into a uint8 buffer."""
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):  # a float code would be truncated silently
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    rows, row_len = rows_and_len(codes.shape)
    flat = codes.reshape(rows, row_len)
    if flat.size and (flat.min() < 0 or flat.max() >= packing.levels):
        raise ValueError(f"codes must lie in [0, {packing.levels}), got [{flat.min()}, {flat.max()}]")
    stride = packing.row_bytes(row_len)
    out = np.zeros(packing.nbytes(codes.shape), dtype=np.uint8)
    body = out[: rows * stride].reshape(rows, stride)
    for block in _row_blocks(rows, packing.fields_per_row(row_len)):
        body[block] = _pack_rows(flat[block], packing)
    return out


def _pack_rows(flat: np.ndarray, packing: Packing) -> np.ndarray:
    rows, row_len = flat.shape
    k, f, base = packing.per_field, packing.field_bits, np.uint64(packing.levels)
    nfields = packing.fields_per_row(row_len)
    digits = np.zeros((rows, nfields * k), dtype=np.uint32)  # the last field is completed with codes 0
    digits[:, :row_len] = flat
    digits = digits.reshape(rows, nfields, k)
    values = np.zeros((rows, nfields), dtype=np.uint64)
    for j in reversed(range(k)):  # Horner: first code least significant
        values = values * base + digits[:, :, j]
    stream = np.zeros((rows, packing.row_bytes(row_len) * 8), dtype=np.uint8)
    bits = stream[:, : nfields * f].reshape(rows, nfields, f)
    for i in range(f):  # one bit plane at a time: a (rows, nfields, f) uint64 array would be 8x the stream
        bits[:, :, i] = (values >> np.uint64(i)) & np.uint64(1)
    return np.packbits(stream, axis=1, bitorder="little")


def unpack_codes(buf: np.ndarray, shape: tuple[int, ...], packing: Packing) -> np.ndarray:
    """Inverse of :func:`pack_codes`: returns codes of ``shape`` as uint16."""
    rows, row_len = rows_and_len(shape)
    buf = np.asarray(buf)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise FormatError(f"packed codes must be a 1-D uint8 buffer, got {buf.dtype} {buf.shape}")
    if buf.size != packing.nbytes(shape):
        raise FormatError(f"packed codes hold {buf.size} bytes; shape {tuple(shape)} at {packing.name} needs {packing.nbytes(shape)}")
    stride = packing.row_bytes(row_len)
    body = buf[: rows * stride].reshape(rows, stride)
    out = np.empty((rows, row_len), dtype=np.uint16)
    for block in _row_blocks(rows, packing.fields_per_row(row_len)):
        out[block] = _unpack_rows(body[block], packing, row_len)
    return out.reshape(shape)


def _unpack_rows(body: np.ndarray, packing: Packing, row_len: int) -> np.ndarray:
    rows = body.shape[0]
    k, f, base = packing.per_field, packing.field_bits, packing.levels
    nfields = packing.fields_per_row(row_len)
    bits = np.unpackbits(body, axis=1, bitorder="little")[:, : nfields * f].reshape(rows, nfields, f)
    values = np.zeros((rows, nfields), dtype=np.uint64)
    for i in reversed(range(f)):
        values = (values << np.uint64(1)) | bits[:, :, i]
    if values.size and int(values.max()) >= base**k:
        raise FormatError(f"packed codes are corrupt: a field exceeds {base}^{k} - 1")
    digits = np.empty((rows, nfields, k), dtype=np.uint16)
    for j in range(k):
        digits[:, :, j] = values % np.uint64(base)
        values //= np.uint64(base)
    return digits.reshape(rows, nfields * k)[:, :row_len]
