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

# Codes per field (K) and field width in bits (F) for each number of levels L:
# the smallest F/K with F <= 32 (F the least with L^K <= 2^F), the smallest K among
# equal ratios (5 levels: 3 codes per 7 bits, not 6 per 14), except that 3 levels use
# 5 codes per byte (1.6 bits, byte fields, a 243-entry table) instead of 17 per
# 27 bits (1.588 bits). Plain grids (L = 2^b) follow the same rule: one code per b-bit
# field. tests/format/test_packing.py derives this table from the rule.
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


def packed_problem(buf: np.ndarray, shape: tuple[int, ...], packing: Packing) -> str | None:
    """What makes a packed buffer of the right size non-conforming, or None (docs/FORMAT.md section 4,
    "What a reader rejects"): a field of L^K or more, a non-zero padding code, unused bit or padding byte.

    Decoding never reads these bits, so only this check sees them; a reader verifying a file runs it.
    """
    rows, row_len = rows_and_len(shape)
    stride, nfields = packing.row_bytes(row_len), packing.fields_per_row(row_len)
    k, f, base = packing.per_field, packing.field_bits, packing.levels
    body_end = rows * stride
    tail = np.flatnonzero(buf[body_end:])
    if tail.size:
        at = body_end + int(tail[0])
        return f"buffer padding byte {at} (after the last row, which ends at byte {body_end}) is {int(buf[at]):#04x}, not 0"
    body = buf[:body_end].reshape(rows, stride)
    used = nfields * f - 8 * (stride - 1)  # bits of each row's last byte that belong to a field, 1..8
    if used < 8:
        high = np.flatnonzero(body[:, -1] >> np.uint8(used))
        if high.size:
            o = int(high[0])
            bits = "bit 7" if used == 7 else f"bits {used}-7"
            return f"row {o}: unused {bits} of its last byte (byte {o * stride + stride - 1}) not 0"
    tail_codes = row_len - (nfields - 1) * k  # codes of the weight in each row's last field, 1..K
    full_limit, last_limit = base**k, base**tail_codes
    if full_limit == 2**f and last_limit == full_limit:  # plain grids: every F-bit field is K codes, none padding
        return None
    for block in _row_blocks(rows, nfields):
        fields = _FieldReader(body[block], f, nfields)
        bad = fields.first_at_least(full_limit, last_limit)
        if bad is not None:
            o, j = bad
            v = fields.value(o, j)
            if v >= full_limit:
                return f"row {o + block.start} field {j} holds {v}, not below {base}^{k} = {full_limit} (a code of {base} or more)"
            return (
                f"row {o + block.start}: padding codes of its last field (field {j}, holding {tail_codes} code(s) of the weight) "
                f"are not 0 (the field holds {v}, not below {base}^{tail_codes} = {last_limit})"
            )
    return None


class _FieldReader:
    """The fields of a block of rows (rows x R bytes), read as unaligned little-endian words.

    Fields repeat their bit offsets every lcm(F, 8) bits (P fields in F*P/8 bytes), so the fields of
    one phase p (j = t*P + p) are one strided view of the bytes: a few passes over the codes, with no
    per-field index arrays and no bit unpacking. Rows are copied into zeroed rows of whole periods
    (plus 8 bytes) so that no read leaves the copy and fields past a row's end read 0.
    """

    def __init__(self, body: np.ndarray, f: int, nfields: int):
        self.f, self.nfields = f, nfields
        # Byte-aligned fields (8 and 16 bits: rows of whole fields) are a plain view of the rows.
        self.aligned = body.view(f"<u{f // 8}") if f in (8, 16) else None
        self.per = 8 // math.gcd(f, 8)  # P: fields per period
        self.period = f * self.per // 8  # bytes per period
        self.periods = -(-nfields // self.per)
        self.rows = body.shape[0]
        if self.aligned is not None:
            return
        # The narrowest word that holds a field at any bit shift (0-7): fewer bytes to move.
        self.dtype = next(np.dtype(f"<u{n}") for n in (2, 4, 8) if f + 7 <= 8 * n)
        self.stride = self.periods * self.period
        self.buf = np.zeros(self.rows * self.stride + 8, dtype=np.uint8)
        self.buf[: self.rows * self.stride].reshape(self.rows, self.stride)[:, : body.shape[1]] = body

    def _words(self, first_byte: int, count: int, step: int) -> np.ndarray:
        """(rows, count) unaligned little-endian words at byte first_byte + t*step of each row."""
        return np.ndarray((self.rows, count), dtype=self.dtype, buffer=self.buf, offset=first_byte, strides=(self.stride, step))

    def first_at_least(self, limit: int, last_limit: int) -> tuple[int, int] | None:
        """(row, field) of the first field, in row-major order, of ``limit`` or more (the last field of a row:
        of ``last_limit`` or more), or None."""
        if self.aligned is not None:
            over = np.empty(self.aligned.shape, dtype=bool)
            np.greater_equal(self.aligned[:, :-1], limit, out=over[:, :-1])
            np.greater_equal(self.aligned[:, -1], last_limit, out=over[:, -1])
            return divmod(int(np.argmax(over)), self.nfields) if over.any() else None
        found = []
        word = self.dtype.type
        top = 8 * self.dtype.itemsize - self.f
        for p in range(min(self.per, self.nfields)):
            first, shift = divmod(p * self.f, 8)
            # With the field in the top bits of the word, it is >= limit iff the word is >= limit << (bits - F).
            over = (self._words(first, self.periods, self.period) << word(top - shift)) >= word(limit << top)
            if over.any():
                o, t = divmod(int(np.argmax(over)), self.periods)
                found.append((o, t * self.per + p))
        last = self.value_column(self.nfields - 1) >= last_limit
        if last.any():
            found.append((int(np.argmax(last)), self.nfields - 1))
        return min(found) if found else None

    def value_column(self, j: int) -> np.ndarray:
        if self.aligned is not None:
            return self.aligned[:, j]
        first, shift = divmod(j * self.f, 8)
        word = self.dtype.type
        return (self._words(first, 1, 1)[:, 0] >> word(shift)) & word((1 << self.f) - 1)

    def value(self, o: int, j: int) -> int:
        return int(self.value_column(j)[o])
