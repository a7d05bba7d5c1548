import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bf.errors import FormatError
from bf.format import Grid, Packing, candidate_layers, pack_codes, unpack_codes
from bf.format import packing as packing_module
from bf.format.packing import BALANCED_FIELDS

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
    codes = np.random.default_rng(0).integers(0, grid.levels, size=(4096, 2560 * 9), dtype=np.uint16)
    assert codes.shape[0] % (packing_module.BLOCK_FIELDS // p.fields_per_row(codes.shape[1])) != 0
    buf = pack_codes(codes, p)
    assert buf.size == p.nbytes(codes.shape)
    np.testing.assert_array_equal(unpack_codes(buf, codes.shape, p), codes)
    row = 4095  # the last row, in the partial block, against the bit-by-bit decoder
    stride = p.row_bytes(codes.shape[1])
    one = reference_decode(buf[row * stride : (row + 1) * stride].tobytes(), (1, codes.shape[1]), p.levels, p.per_field, p.field_bits)
    np.testing.assert_array_equal(one[0], codes[row])
