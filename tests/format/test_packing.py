import math
import struct
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bf.errors import FormatError
from bf.format import Grid, Packing, candidate_layers, pack_codes, unpack_codes
from bf.format import packing as packing_module
from bf.format.packing import BALANCED_FIELDS, packed_problem

GRIDS = [Grid(b, k) for b in range(1, 9) for k in ("balanced", "plain")]


def reference_decode(buf: bytes, shape, levels: int, per_field: int, field_bits: int) -> np.ndarray:
    """A decoder written from docs/FORMAT.md alone, one bit at a time."""
    rows, n = shape[0], math.prod(shape[1:])
    nfields = -(-n // per_field)
    stride = -(-nfields * field_bits // 8)
    out = np.zeros((rows, n), dtype=np.int64)
    for r in range(rows):
        row = []
        for j in range(nfields):
            v = 0
            for i in range(field_bits):
                bit = r * stride * 8 + j * field_bits + i
                v |= ((buf[bit // 8] >> (bit % 8)) & 1) << i
            for _ in range(per_field):
                row.append(v % levels)
                v //= levels
        out[r] = row[:n]
    return out.reshape(shape)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.kind}{g.bits}")
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 2, 3, 3), (4, 29), (2, 61), (7, 5, 1, 1)])
def test_round_trip_every_width(grid, shape):
    rng = np.random.default_rng(grid.bits * 100 + len(shape))
    codes = rng.integers(0, grid.levels, size=shape)
    codes.flat[0] = grid.levels - 1  # the extreme codes must survive
    codes.flat[-1] = 0
    p = Packing.for_grid(grid)
    buf = pack_codes(codes, p)
    assert buf.dtype == np.uint8 and buf.size == p.nbytes(shape)
    np.testing.assert_array_equal(unpack_codes(buf, shape, p), codes)
    np.testing.assert_array_equal(reference_decode(buf.tobytes(), shape, p.levels, p.per_field, p.field_bits), codes)


@settings(max_examples=60, deadline=None)
@given(
    grid=st.sampled_from(GRIDS),
    rows=st.integers(1, 6),
    row_len=st.integers(1, 200),
    seed=st.integers(0, 2**31),
)
def test_round_trip_property(grid, rows, row_len, seed):
    codes = np.random.default_rng(seed).integers(0, grid.levels, size=(rows, row_len))
    p = Packing.for_grid(grid)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, p), codes.shape, p), codes)


def test_worked_examples_from_format_doc():
    # 1-bit balanced: levels [1,-1,0,1,1,0] -> codes [2,0,1,2,2,1]; field 2+0*3+1*9+2*27+2*81 = 227
    buf = pack_codes(np.array([[2, 0, 1, 2, 2, 1]]), Packing.for_grid(Grid(1)))
    assert buf.tobytes() == bytes([0xE3, 0x01, 0, 0, 0, 0, 0, 0])
    # 2-bit balanced: levels [2,-2,0,1] -> codes [4,0,2,3]; fields 4+0*5+2*25 = 54 and 3, 7 bits each
    buf = pack_codes(np.array([[4, 0, 2, 3]]), Packing.for_grid(Grid(2)))
    assert buf.tobytes() == bytes([0xB6, 0x01, 0, 0, 0, 0, 0, 0])
    # plain 3-bit: one code per 3-bit field; codes [5, 2, 7] -> bits 101 010 111 -> 0b11_010_101, 0b1
    buf = pack_codes(np.array([[5, 2, 7]]), Packing.for_grid(Grid(3, "plain")))
    assert buf.tobytes() == bytes([0b11010101, 0b1, 0, 0, 0, 0, 0, 0])


def test_rows_start_on_byte_boundaries():
    p = Packing.for_grid(Grid(2))  # 7-bit fields: a 4-code row needs 14 bits -> 2 bytes
    a = np.array([[4, 4, 4, 4], [1, 2, 3, 0]])
    buf = pack_codes(a, p)
    assert p.row_bytes(4) == 2
    # the second row's bytes are exactly what packing that row alone gives
    np.testing.assert_array_equal(buf[2:4], pack_codes(a[1:], p)[:2])
    np.testing.assert_array_equal(buf[0:2], pack_codes(a[:1], p)[:2])


def word_decode(buf: bytes, shape, levels: int, per_field: int, field_bits: int) -> np.ndarray:
    """Decode as docs/FORMAT.md section 4 "Buffer" allows: each field from its two aligned 32-bit words.

    Returns every code of every field, the padding codes of each row's last field included.
    """
    rows, n = shape[0], math.prod(shape[1:])
    nfields = -(-n // per_field)
    stride = -(-nfields * field_bits // 8)
    out = np.zeros((rows, nfields * per_field), dtype=np.int64)
    for r in range(rows):
        for j in range(nfields):
            b = 8 * r * stride + j * field_bits
            lo, hi = struct.unpack_from("<II", buf, 4 * (b // 32))  # raises if the tail padding is short
            v = (((hi << 32) | lo) >> (b % 32)) & ((1 << field_bits) - 1)
            for t in range(per_field):
                out[r, j * per_field + t] = v % levels
                v //= levels
    return out


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.kind}{g.bits}")
def test_tail_padding_is_zero_and_allows_two_aligned_word_loads(grid):
    p = Packing.for_grid(grid)
    rng = np.random.default_rng(grid.bits)
    for shape in [(1, 1), (3, 5), (17, 33), (4, 2, 3, 3)]:
        rows, n = shape[0], math.prod(shape[1:])
        # all codes at L-1 set as many bits as possible; a random row as well
        for codes in (np.full(shape, grid.levels - 1), rng.integers(0, grid.levels, size=shape)):
            buf = pack_codes(codes, p)
            stride = p.row_bytes(n)
            assert buf.size % 4 == 0 and buf.size - rows * stride >= 4
            assert not buf[rows * stride :].any(), "bytes after the last row must be 0"
            used = p.fields_per_row(n) * p.field_bits - 8 * (stride - 1)  # bits of each row's last byte in use
            last = buf[: rows * stride].reshape(rows, stride)[:, -1]
            assert not (last >> used).any(), "unused high bits of a row's last byte must be 0"
            decoded = word_decode(buf.tobytes(), shape, p.levels, p.per_field, p.field_bits)
            np.testing.assert_array_equal(decoded[:, :n].reshape(shape), codes)
            assert not decoded[:, n:].any(), "the last field is completed with codes 0"


def test_bits_per_code_of_the_format_table():
    rates = {L: f / k for L, (k, f) in BALANCED_FIELDS.items()}
    assert [round(rates[2**b + 1], 3) for b in range(1, 9)] == [1.6, 2.333, 3.2, 4.143, 5.167, 6.2, 7.25, 8.333]
    for b in range(1, 9):
        assert Packing.for_grid(Grid(b, "plain")).bits_per_code == b


# Limits of the foundation issue, measured over all layers of one width in SD-v1.5.
LIMITS = {1: 1.61, 2: 2.34, 3: 3.34, 4: 4.34, 5: 5.5, 6: 6.5, 7: 7.5, 8: 8.5}


def _sd15_shapes():
    import torch
    from diffusers import UNet2DConditionModel

    from bf.models.architectures import SD15_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def test_stored_bits_on_sd15_architecture_meet_limits():
    layers = candidate_layers(_sd15_shapes())
    assert len(layers) == 256  # docs/RECIPE.md section 3
    params = sum(math.prod(s) for s in layers.values())
    for bits, limit in LIMITS.items():
        for kind in ("balanced", "plain"):
            p = Packing.for_grid(Grid(bits, kind))
            stored = 8 * sum(p.nbytes(s) for s in layers.values()) / params
            assert stored <= (limit if kind == "balanced" else bits + 1e-4), (bits, kind, stored)


def test_unpack_rejects_wrong_size_and_corrupt_fields():
    p = Packing.for_grid(Grid(2))
    buf = pack_codes(np.zeros((2, 6), dtype=int), p)
    with pytest.raises(FormatError, match="needs"):
        unpack_codes(buf[:-1], (2, 6), p)
    bad = buf.copy()
    bad[0] = 0x7F  # field 127 > 5^3 - 1
    with pytest.raises(FormatError, match="corrupt"):
        unpack_codes(bad, (2, 6), p)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(np.array([[0, 5]]), Packing.for_grid(Grid(2)))


def test_pack_rejects_float_codes():
    with pytest.raises(ValueError, match="integer dtype"):
        pack_codes(np.array([[0.0, 1.7]]), Packing.for_grid(Grid(2)))


@pytest.mark.parametrize("levels,per_field,field_bits", [(65537, 1, 32), (2, 33, 32), (1, 1, 8), (3, 0, 8), (3, 1, 33)])
def test_packing_bounds_are_checked_first(levels, per_field, field_bits):
    # Checked before L**K: a crafted K of 10**9 would compute for hours (test_checkpoint runs that case in a subprocess).
    with pytest.raises(ValueError, match="invalid packing"):
        Packing(levels, per_field, field_bits)


@pytest.mark.parametrize("grid", [Grid(1), Grid(2), Grid(4), Grid(8), Grid(3, "plain")], ids=str)
def test_row_blocks_do_not_change_the_bytes(grid, monkeypatch):
    """Rows go through in blocks; a row count that is no multiple of the block must still round-trip."""
    p = Packing.for_grid(grid)
    codes = np.random.default_rng(grid.bits).integers(0, grid.levels, size=(23, 3, 5))
    whole = pack_codes(codes, p)
    monkeypatch.setattr(packing_module, "BLOCK_FIELDS", 3 * p.fields_per_row(15))  # blocks of 3 rows, the last one of 2
    assert len(packing_module._row_blocks(23, p.fields_per_row(15))) == 8
    np.testing.assert_array_equal(pack_codes(codes, p), whole)
    np.testing.assert_array_equal(unpack_codes(whole, codes.shape, p), codes)
    np.testing.assert_array_equal(reference_decode(whole.tobytes(), codes.shape, p.levels, p.per_field, p.field_bits), codes)


def test_large_layer_round_trip():
    """A 1280x2560x3x3-sized 8-bit layer, several blocks of rows with a partial last one."""
    grid = Grid(8)
    p = Packing.for_grid(grid)
    codes = np.random.default_rng(0).integers(0, grid.levels, size=(1280, 2560 * 9), dtype=np.uint16)
    assert codes.shape[0] % (packing_module.BLOCK_FIELDS // p.fields_per_row(codes.shape[1])) != 0
    buf = pack_codes(codes, p)
    assert buf.size == p.nbytes(codes.shape)
    np.testing.assert_array_equal(unpack_codes(buf, codes.shape, p), codes)
    row = 1279  # the last row, in the partial block, against the bit-by-bit decoder
    stride = p.row_bytes(codes.shape[1])
    one = reference_decode(buf[row * stride : (row + 1) * stride].tobytes(), (1, codes.shape[1]), p.levels, p.per_field, p.field_bits)
    np.testing.assert_array_equal(one[0], codes[row])
    assert packed_problem(buf, codes.shape, p) is None
    last = p.fields_per_row(codes.shape[1]) - 1  # the last field of the last row, in the partial block
    bad = buf.copy()
    _put_field(bad, 8 * row * stride + last * p.field_bits, p.field_bits, 257**3)
    expected = f"row {row} field {last} holds 16974593, not below 257^3 = 16974593 (a code of 257 or more)"
    assert packed_problem(bad, codes.shape, p) == expected


def field_rule(levels: int) -> tuple[int, int]:
    """docs/FORMAT.md section 4, from its words: the smallest F/K with F <= 32, F the least number of bits
    with L^K <= 2^F, and among equal ratios the smallest K."""
    options = []
    for k in range(1, 33):
        f = next((f for f in range(1, 33) if levels**k <= 2**f), None)
        if f is not None:
            options.append((Fraction(f, k), k, f))
    _, k, f = min(options)
    return k, f


def test_field_table_is_the_documented_rule():
    derived = {2**b + 1: field_rule(2**b + 1) for b in range(1, 9)}
    assert derived.pop(3) == (17, 27)  # the one exception: 3 levels use 5 codes per byte instead
    assert BALANCED_FIELDS[3] == (5, 8)
    assert {levels: kf for levels, kf in BALANCED_FIELDS.items() if levels != 3} == derived
    # The ties the rule settles: 5 levels fit 3 codes in 7 bits as they fit 6 in 14, 9 in 21 and 12 in 28.
    assert [k for k in range(1, 13) if 5**k <= 2 ** (7 * k // 3) and 7 * k % 3 == 0] == [3, 6, 9, 12]
    assert field_rule(5) == (3, 7) and field_rule(9) == (5, 16)  # not (10, 32)
    for b in range(1, 9):
        plain = Packing.for_grid(Grid(b, "plain"))
        assert (plain.per_field, plain.field_bits) == field_rule(2**b) == (1, b)
        balanced = Packing.for_grid(Grid(b))
        assert (balanced.levels, balanced.per_field, balanced.field_bits) == (2**b + 1, *BALANCED_FIELDS[2**b + 1])


def spec_problem(buf: bytes, shape, levels: int, per_field: int, field_bits: int) -> str | None:
    """docs/FORMAT.md section 4 "What a reader rejects", one bit at a time: the first problem, in the order
    padding bytes, unused bits (row by row), fields (row by row, field by field); None for a conforming buffer."""
    rows, n = shape[0], math.prod(shape[1:])
    nfields = -(-n // per_field)
    stride = -(-nfields * field_bits // 8)

    def bit(t):
        return (buf[t // 8] >> (t % 8)) & 1

    if any(buf[rows * stride :]):
        return "buffer padding byte"
    for o in range(rows):
        if any(bit(8 * o * stride + t) for t in range(nfields * field_bits, 8 * stride)):
            return f"row {o}: unused"
    for o in range(rows):
        for j in range(nfields):
            v = sum(bit(8 * o * stride + j * field_bits + i) << i for i in range(field_bits))
            codes = []
            for _ in range(per_field):
                codes.append(v % levels)
                v //= levels
            if v:  # what is left after K codes: the field is L^K or more
                return f"row {o} field {j} holds"
            if j == nfields - 1 and any(codes[n - j * per_field :]):
                return f"row {o}: padding codes of its last field (field {j},"
    return None


@settings(max_examples=300, deadline=None)
@given(grid=st.sampled_from(GRIDS), rows=st.integers(1, 5), row_len=st.integers(1, 40), seed=st.integers(0, 2**31), flips=st.integers(0, 2))
def test_packed_problem_agrees_with_the_spec(grid, rows, row_len, seed, flips):
    rng = np.random.default_rng(seed)
    p = Packing.for_grid(grid)
    buf = pack_codes(rng.integers(0, grid.levels, size=(rows, row_len)), p)
    assert packed_problem(buf, (rows, row_len), p) is None  # what bf writes conforms
    for at in rng.integers(0, 8 * buf.size, size=flips):
        buf[at // 8] ^= np.uint8(1 << (at % 8))
    expected = spec_problem(buf.tobytes(), (rows, row_len), p.levels, p.per_field, p.field_bits)
    got = packed_problem(buf, (rows, row_len), p)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected), (got, expected)


def _put_field(buf: np.ndarray, bit: int, field_bits: int, value: int) -> None:
    for i in range(field_bits):
        byte, b = divmod(bit + i, 8)
        buf[byte] = (buf[byte] & ~np.uint8(1 << b)) | np.uint8(((value >> i) & 1) << b)


def test_packed_problem_messages_on_the_worked_examples():
    one = Packing.for_grid(Grid(1))  # [2, 0, 1, 2, 2, 1]: fields 227 and 1 (one code of the weight), R = 2
    buf = pack_codes(np.array([[2, 0, 1, 2, 2, 1]]), one)
    assert packed_problem(buf, (1, 6), one) is None
    bad = buf.copy()
    bad[0] = 243
    assert packed_problem(bad, (1, 6), one) == "row 0 field 0 holds 243, not below 3^5 = 243 (a code of 3 or more)"
    bad = buf.copy()
    bad[1] = 1 + 3  # the second code of the last field is a padding code
    assert packed_problem(bad, (1, 6), one) == (
        "row 0: padding codes of its last field (field 1, holding 1 code(s) of the weight) are not 0 (the field holds 4, not below 3^1 = 3)"
    )
    two = Packing.for_grid(Grid(2))  # [4, 0, 2, 3]: 7-bit fields 54 and 3 in bits 0-13, R = 2, buffer of 8 bytes
    buf = pack_codes(np.array([[4, 0, 2, 3]]), two)
    bad = buf.copy()
    bad[1] |= 0x40  # bit 14 of the row: past both fields
    assert packed_problem(bad, (1, 4), two) == "row 0: unused bits 6-7 of its last byte (byte 1) not 0"
    bad = buf.copy()
    bad[5] = 0x80
    assert packed_problem(bad, (1, 4), two) == "buffer padding byte 5 (after the last row, which ends at byte 2) is 0x80, not 0"
    bad = buf.copy()
    _put_field(bad, 7, 7, 126)  # field 1: 126 >= 5^3
    assert packed_problem(bad, (1, 4), two) == "row 0 field 1 holds 126, not below 5^3 = 125 (a code of 5 or more)"


@pytest.mark.parametrize("grid", [Grid(1), Grid(2), Grid(3), Grid(4), Grid(8)], ids=str)
def test_packed_problem_names_the_first_bad_field_across_row_blocks(grid, monkeypatch):
    p = Packing.for_grid(grid)
    shape = (23, 3, 5)
    nfields, stride = p.fields_per_row(15), p.row_bytes(15)
    monkeypatch.setattr(packing_module, "BLOCK_FIELDS", 3 * nfields)  # blocks of 3 rows
    buf = pack_codes(np.random.default_rng(grid.bits).integers(0, grid.levels, size=shape), p)
    limit = p.levels**p.per_field
    _put_field(buf, 8 * 20 * stride + 1 * p.field_bits, p.field_bits, limit)  # row 20, field 1
    _put_field(buf, 8 * 22 * stride, p.field_bits, limit + 1)  # a later one
    expected = f"row 20 field 1 holds {limit}, not below {p.levels}^{p.per_field} = {limit} (a code of {p.levels} or more)"
    assert packed_problem(buf, shape, p) == expected
