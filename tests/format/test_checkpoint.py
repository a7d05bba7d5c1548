import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bf.atomic import atomic_dir
from bf.errors import BfError, FormatError
from bf.format import Bundle, Checkpoint, Grid, QuantizedLayer, read_header
from bf.format.checkpoint import FORMAT_VERSION, HEADER_KEY
from tests.conftest import REPO


def make_checkpoint(bundle: bool = False) -> Checkpoint:
    rng = np.random.default_rng(0)
    layers = {}
    for name, shape, grid in [
        ("conv_in", (8, 4, 3, 3), Grid(8)),
        ("down.attn.to_q", (6, 10), Grid(1)),
        ("down.ff", (5, 7), Grid(3, "plain")),
        ("up.conv", (3, 2, 3, 3), Grid(4)),
    ]:
        levels = rng.integers(grid.qmin, grid.qmax + 1, size=shape)
        layers[name] = QuantizedLayer.from_levels(name, levels, rng.random(shape[0]).astype(np.float32) + 0.01, grid)
    tensors = {
        "conv_in.bias": rng.standard_normal(8).astype(np.float16),
        "time_embedding.linear_1.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "down.resnets.0.time_emb_proj.weight": rng.standard_normal((12, 16)).astype(np.float32),
    }
    b = None
    if bundle:
        b = Bundle(
            files={"model_index.json": b'{"a": 1}', "tokenizer/merges.txt": b"#version: 0.2\na b\n"},
            tensors={"text_encoder": {"emb.weight": rng.standard_normal((4, 3)).astype(np.float16)}, "vae": {"x": np.ones(2, np.float16)}},
        )
    return Checkpoint(
        unet_config={"block_out_channels": [8]},
        layers=layers,
        tensors=tensors,
        base_model={"path": "/models/x", "hash": "sha256:00"},
        recipe={"grid": "balanced"},
        provenance={"command": "bf test"},
        bundle=b,
    )


@pytest.mark.parametrize("bundle", [False, True])
def test_round_trip_is_exact(tmp_path, bundle):
    ckpt = make_checkpoint(bundle)
    path = tmp_path / "m.bfq"
    ckpt.save(path)
    back = Checkpoint.load(path)
    assert back.unet_config == ckpt.unet_config and back.base_model == ckpt.base_model
    assert back.recipe == ckpt.recipe and back.provenance == ckpt.provenance
    assert list(back.layers) == list(ckpt.layers)
    for name, layer in ckpt.layers.items():
        got = back.layers[name]
        assert (got.shape, got.grid) == (layer.shape, layer.grid)
        np.testing.assert_array_equal(got.codes, layer.codes)
        np.testing.assert_array_equal(got.scale, layer.scale)
        np.testing.assert_array_equal(got.levels(), layer.levels())
    for k, v in ckpt.tensors.items():
        assert back.tensors[k].dtype == v.dtype
        np.testing.assert_array_equal(back.tensors[k], v)
    if bundle:
        assert back.bundle.files == ckpt.bundle.files
        assert {c: set(p) for c, p in back.bundle.tensors.items()} == {c: set(p) for c, p in ckpt.bundle.tensors.items()}
        for comp in ("text_encoder", "vae"):
            for k, v in ckpt.bundle.tensors[comp].items():
                assert back.bundle.tensors[comp][k].dtype == v.dtype
                np.testing.assert_array_equal(back.bundle.tensors[comp][k], v)
    else:
        assert back.bundle is None
    assert read_header(path)["format_version"] == FORMAT_VERSION


def test_dequantize_is_scale_times_level():
    layer = make_checkpoint().layers["up.conv"]
    w = layer.dequantize()
    assert w.dtype == np.float32 and w.shape == layer.shape
    np.testing.assert_array_equal(w, layer.levels().astype(np.float32) * layer.scale[:, None, None, None])
    sd = make_checkpoint().unet_state_dict()
    assert set(sd) >= {"up.conv.weight", "conv_in.bias", "time_embedding.linear_1.weight"}


def test_levels_out_of_range_are_refused():
    with pytest.raises(ValueError, match="outside"):
        QuantizedLayer.from_levels("x", np.array([[3, 0]]), np.ones(1), Grid(1))


def test_fractional_levels_are_refused_not_truncated():
    with pytest.raises(ValueError, match="integers"):
        QuantizedLayer.from_levels("x", np.array([[0.5, -1.0]]), np.ones(1), Grid(1))
    with pytest.raises(ValueError, match="integers"):
        QuantizedLayer.from_levels("x", np.array([[np.nan, 0.0]]), np.ones(1), Grid(1))
    integral = np.array([[1.0, -1.0, 0.0]], dtype=np.float32)  # what round() gives: accepted
    np.testing.assert_array_equal(QuantizedLayer.from_levels("x", integral, np.ones(1), Grid(1)).levels(), [[1, -1, 0]])
    ints = np.array([[2, -2]], dtype=np.int8)
    np.testing.assert_array_equal(QuantizedLayer.from_levels("x", ints, np.ones(1), Grid(2)).levels(), ints)


def test_saved_file_has_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        make_checkpoint().save(tmp_path / "m.bfq")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.bfq").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_atomic_dir_permissions_and_old_directory(tmp_path):
    final = tmp_path / "model"
    bystander = tmp_path / ".model.old"  # a fixed name for the old copy would delete this
    bystander.mkdir()
    (bystander / "keep").write_text("mine")
    old = os.umask(0o022)
    try:
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("1")
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "b").write_text("2")
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert [p.name for p in final.iterdir()] == ["b"]
    assert (bystander / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old", "model"]


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import subprocess

    from bf.atomic import atomic_path

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now
    stale_file = tmp_path / f".m.bfq.{dead.pid}-abc.tmp"
    stale_dir = tmp_path / f".model.{dead.pid}-def.tmp"
    live = tmp_path / f".m.bfq.{os.getpid()}-ghi.tmp"  # a writer that still runs (this one)
    other = tmp_path / ".m.bfq.notes.tmp"  # not a name the writers make
    stale_file.write_bytes(b"")  # what a SIGKILL during a state save leaves
    stale_dir.mkdir()
    (stale_dir / "unet.onnx").write_bytes(b"x")
    for p in (live, other):
        p.write_bytes(b"")
    with atomic_path(tmp_path / "m.bfq") as tmp:
        tmp.write_bytes(b"new")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "m.bfq", "model"])


def test_an_empty_directory_is_replaced_and_a_full_one_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a"]
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temporary went too


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    def boom(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        make_checkpoint().save(tmp_path / "m.bfq")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.bfq"
    make_checkpoint().save(path)
    before = path.read_bytes()
    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        make_checkpoint(bundle=True).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.bfq"]


# ---- bad files ---------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.bfq"
    make_checkpoint().save(path)
    return path


def header_sha256(bf_header: dict) -> str:
    """docs/FORMAT.md section 2: SHA-256 of the canonical JSON of the header without its own key."""
    rest = {k: v for k, v in bf_header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rewrite_st_header(path, edit):
    """Re-encode the safetensors header after ``edit(st_header_dict)``, keeping the data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st_header = json.loads(raw[8 : 8 + n])
    edit(st_header)
    new = json.dumps(st_header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _rewrite_header(path, edit=None, raw_text=None, reseal=True):
    """Edit the bf header; ``reseal`` recomputes its checksum, as a crafted (not a damaged) file would."""

    def edit_st(st_header):
        text = raw_text
        if text is None:
            bf_header = json.loads(st_header["__metadata__"][HEADER_KEY])
            edit(bf_header)
            if reseal:
                bf_header["header_sha256"] = header_sha256(bf_header)
            text = json.dumps(bf_header)
        st_header["__metadata__"][HEADER_KEY] = text

    _rewrite_st_header(path, edit_st)


def test_missing_file(tmp_path):
    with pytest.raises(BfError, match="no such file"):
        Checkpoint.load(tmp_path / "nope.bfq")


def test_truncated_file(saved):
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"m\.bfq: not a readable \.bfq file"):
        Checkpoint.load(saved)


def test_garbage_file(saved):
    saved.write_bytes(b"\x00" * 3)
    with pytest.raises(FormatError, match="not a readable"):
        Checkpoint.load(saved)


def test_corrupted_data_byte_fails_checksum(saved):
    raw = bytearray(saved.read_bytes())
    raw[-1] ^= 0xFF
    saved.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum mismatch in tensor"):
        Checkpoint.load(saved)
    Checkpoint.load(saved, verify=False)  # the damage is only visible to the checksum


@pytest.mark.parametrize(
    "version,match",
    [(FORMAT_VERSION + 1, "newer bf.*upgrade bf"), (0, "no longer read"), ("1", "no format version")],
)
def test_wrong_version(saved, version, match):
    _rewrite_header(saved, lambda h: h.__setitem__("format_version", version))
    with pytest.raises(FormatError, match=match):
        Checkpoint.load(saved)


def test_shape_mismatch(saved):
    def edit(h):
        h["layers"][1]["shape"] = [6, 11]

    _rewrite_header(saved, edit)
    with pytest.raises(FormatError, match=r"down\.attn\.to_q.*codes are uint8"):
        Checkpoint.load(saved)


def test_unknown_packing(saved):
    def edit(h):
        h["layers"][0]["packing"]["per_field"] = 2

    _rewrite_header(saved, edit)
    with pytest.raises(FormatError, match="does not define"):
        Checkpoint.load(saved)


def test_header_checksum_is_documented_and_checked(saved):
    header = read_header(saved)
    assert header["header_sha256"] == header_sha256(header)
    _rewrite_header(saved, lambda h: h["unet_config"].__setitem__("block_out_channels", [9]), reseal=False)
    with pytest.raises(FormatError, match=r"m\.bfq: header checksum mismatch \(file corrupted\)"):
        Checkpoint.load(saved)
    assert Checkpoint.load(saved, verify=False).unet_config == {"block_out_channels": [9]}


def test_bit_flip_in_a_layer_shape_is_caught(saved):
    """(5, 7) -> (5, 6) is one flipped bit and needs the same code bytes: only the header checksum sees it."""
    raw = bytearray(saved.read_bytes())
    assert raw.count(b"[5, 7]") == 1
    at = raw.index(b"[5, 7]") + 4
    raw[at] ^= 0x01  # "7" -> "6"
    saved.write_bytes(bytes(raw))
    assert Checkpoint.load(saved, verify=False).layers["down.ff"].shape == (5, 6)
    with pytest.raises(FormatError, match="header checksum mismatch"):
        Checkpoint.load(saved)


def test_tensor_dtype_edit_is_caught(saved):
    """F16 -> I16 keeps every byte of the data; the tensor checksum covers the dtype."""
    _rewrite_st_header(saved, lambda st: st["unet/conv_in.bias"].__setitem__("dtype", "I16"))
    assert Checkpoint.load(saved, verify=False).tensors["conv_in.bias"].dtype == np.int16
    with pytest.raises(FormatError, match=r"checksum mismatch in tensor 'unet/conv_in\.bias'"):
        Checkpoint.load(saved)


def test_tensor_shape_edit_is_caught(saved):
    _rewrite_st_header(saved, lambda st: st["unet/time_embedding.linear_1.weight"].__setitem__("shape", [8, 16]))
    with pytest.raises(FormatError, match=r"checksum mismatch in tensor 'unet/time_embedding\.linear_1\.weight'"):
        Checkpoint.load(saved)


def test_infinite_shape_is_a_format_error(saved):
    _rewrite_header(saved, lambda h: h["layers"][0].__setitem__("shape", [float("inf"), 4, 3, 3]))
    with pytest.raises(FormatError, match=r"header value layers\[0\]\.shape\[0\] = inf is not a finite number"):
        Checkpoint.load(saved)


def test_huge_per_field_fails_fast(saved):
    """A crafted packing record must be refused before anything computes levels**per_field."""
    _rewrite_header(saved, lambda h: h["layers"][1]["packing"].__setitem__("per_field", 1_000_000_000))
    code = (
        "import sys\nfrom bf.format import Checkpoint\nfrom bf.errors import FormatError\n"
        f"try:\n    Checkpoint.load({str(saved)!r})\nexcept FormatError as e:\n    print(e)\n    sys.exit(0)\nsys.exit(1)\n"
    )
    # A subprocess: a hang in C code cannot be interrupted from inside this one.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and "does not define" in r.stdout, r.stdout + r.stderr


def test_corrupt_header_json(saved):
    _rewrite_header(saved, raw_text='{"format_version": 1, "layers": [')
    with pytest.raises(FormatError, match="corrupt header"):
        Checkpoint.load(saved)


def test_header_missing_fields(saved):
    _rewrite_header(saved, lambda h: h.pop("unet_tensors"))
    with pytest.raises(FormatError, match="malformed header"):
        Checkpoint.load(saved)


def test_plain_safetensors_is_not_a_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": np.ones(3, np.float32)}, str(path))
    with pytest.raises(FormatError, match="not a bf checkpoint"):
        Checkpoint.load(path)


# ---- docs/FORMAT.md section 2: canonical JSON, base model and recipe ----------------------


def spec_float(x: float) -> str:
    """A float as the canonical JSON writes it, from the doc's words. The shortest round-trip digits come
    from NumPy's Dragon4, not from Python's repr."""
    mantissa, exponent = np.format_float_scientific(x, unique=True, trim="-").split("e")
    sign, digits, e = "-" if mantissa.startswith("-") else "", mantissa.lstrip("-").replace(".", ""), int(exponent)
    if -4 <= e < 16:
        if e >= 0:
            whole, frac = (digits + "0" * (e + 1))[: e + 1], digits[e + 1 :] or "0"
        else:
            whole, frac = "0", "0" * (-e - 1) + digits
        return f"{sign}{whole}.{frac}"
    return f"{sign}{digits[0]}{'.' + digits[1:] if len(digits) > 1 else ''}e{'-' if e < 0 else '+'}{abs(e):02d}"


SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def spec_string(s: str) -> str:
    out = []
    for ch in s:
        c = ord(ch)
        if ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif 0x20 <= c <= 0x7E:
            out.append(ch)
        elif c > 0xFFFF:  # a UTF-16 surrogate pair, each half escaped
            c -= 0x10000
            out.append(f"\\u{0xD800 + (c >> 10):04x}\\u{0xDC00 + (c & 0x3FF):04x}")
        else:
            out.append(f"\\u{c:04x}")
    return '"' + "".join(out) + '"'


def spec_json(v) -> str:
    """docs/FORMAT.md section 2 "Canonical JSON", written from the doc (no json module)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return spec_float(v)
    if isinstance(v, str):
        return spec_string(v)
    if isinstance(v, list):
        return "[" + ",".join(spec_json(x) for x in v) + "]"
    keys = sorted(v, key=lambda k: [ord(c) for c in k])  # code point by code point
    return "{" + ",".join(spec_string(k) + ":" + spec_json(v[k]) for k in keys) + "}"


def spec_header_sha256(header: dict) -> str:
    return hashlib.sha256(spec_json({k: v for k, v in header.items() if k != "header_sha256"}).encode("ascii")).hexdigest()


# The worked example of docs/FORMAT.md section 2.
EXAMPLE_HEADER = {
    "format": "bf.bfq",
    "format_version": 1,
    "unet_config": {"sample_size": 64, "norm_eps": 1e-05, "mid_block_scale_factor": 1.0},
    "recipe": {"eta": 0.3, "lr": 0.0001, "threshold": 1e16},
    "provenance": {"command": "bf quantize --out café.bfq"},
    "bundle": None,
    "header_sha256": "ignored: the key is left out",
}
EXAMPLE_CANONICAL = (
    '{"bundle":null,"format":"bf.bfq","format_version":1,"provenance":{"command":"bf quantize --out caf\\u00e9.bfq"},'
    '"recipe":{"eta":0.3,"lr":0.0001,"threshold":1e+16},"unet_config":{"mid_block_scale_factor":1.0,"norm_eps":1e-05,"sample_size":64}}'
)
EXAMPLE_SHA256 = "ce6221137a90ac99bf48e472794b12abbbcf84775032e344de28273ea91abeef"


def test_header_sha256_worked_example():
    from bf.format.checkpoint import _header_sha256

    assert spec_json({k: v for k, v in EXAMPLE_HEADER.items() if k != "header_sha256"}) == EXAMPLE_CANONICAL
    assert hashlib.sha256(EXAMPLE_CANONICAL.encode("ascii")).hexdigest() == EXAMPLE_SHA256
    assert _header_sha256(EXAMPLE_HEADER) == EXAMPLE_SHA256


def test_header_sha256_recomputed_from_the_spec(saved):
    shipped = read_header(REPO / "bf" / "assets" / "shapes-sd-1.99bit.bfq")
    assert shipped["recipe"]["threshold"] == 3.9431760295368725e-05  # a float written with an exponent
    assert spec_header_sha256(shipped) == shipped["header_sha256"]
    assert spec_header_sha256(read_header(saved)) == read_header(saved)["header_sha256"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_canonical_json_rules_are_what_bf_hashes(value):
    assert spec_json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_in_the_header_are_refused(saved, token):
    def edit(st_header):
        text = st_header["__metadata__"][HEADER_KEY]
        st_header["__metadata__"][HEADER_KEY] = text.replace('"provenance": {', f'"provenance": {{"x": {token}, ', 1)

    _rewrite_st_header(saved, edit)
    for verify in (True, False):
        with pytest.raises(FormatError, match=r"m\.bfq: header value provenance\.x = -?(nan|inf) is not a finite number"):
            Checkpoint.load(saved, verify=verify)


def test_non_finite_numbers_are_not_written(tmp_path):
    ckpt = make_checkpoint()
    ckpt.recipe = {"grid": "balanced", "histogram": [{"share": float("nan")}]}
    with pytest.raises(BfError, match=r"m\.bfq: not written: header value recipe\.histogram\[0\]\.share = nan is not a finite number"):
        ckpt.save(tmp_path / "m.bfq")
    assert list(tmp_path.iterdir()) == []


def test_duplicate_header_keys_are_refused(saved):
    def edit(st_header):
        text = st_header["__metadata__"][HEADER_KEY]
        st_header["__metadata__"][HEADER_KEY] = text.replace('"provenance": {', '"provenance": {"command": "x", ', 1)

    _rewrite_st_header(saved, edit)
    with pytest.raises(FormatError, match="header has the key 'command' twice in one object"):
        Checkpoint.load(saved)


def test_dequantize_rounds_the_float32_product_to_nearest_even():
    """docs/FORMAT.md section 3: scale 0x3f800001 times level 3 is exactly halfway between two float32 numbers."""
    scale = np.array([0x3F800001], dtype=np.uint32).view(np.float32)
    layer = QuantizedLayer.from_levels("x", np.array([[3, -3, 1]]), scale, Grid(3))
    w = layer.dequantize()
    assert [f"{b:08x}" for b in w.view(np.uint32)[0]] == ["40400002", "c0400002", "3f800001"]
    assert float(scale[0]) * 3 == 3.00000035762786865234375 != float(w[0, 0]) == 3.000000476837158203125


def test_recipe_hash_recomputed_from_the_spec(tmp_path):
    from bf.trainer.recipe import load_recipe

    recipe = read_header(REPO / "bf" / "assets" / "shapes-sd-1.99bit.bfq")["recipe"]
    # {"grid":...,"layers":{...}} with keys in code point order, no whitespace: module names are ASCII, bits integers.
    text = '{"grid":"' + recipe["grid"] + '","layers":{' + ",".join(f'"{m}":{b}' for m, b in sorted(recipe["layers"].items())) + "}}"
    assert recipe["hash"] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert recipe["hash"] == "sha256:a2487144da683b7cb01c095e51491a5a78a347afd4678e21104d88a306041001"
    # A hand-edited recipe (no hash, no grid) is recorded with both; the example of docs/FORMAT.md section 2.
    path = tmp_path / "r.json"
    layers = '{"up_blocks.1.resnets.0.conv1": 1, "mid_block.attentions.0.proj_in": 2}'
    path.write_text('{"format": "bf.recipe", "version": 1, "layers": ' + layers + "}")
    loaded = load_recipe(path)
    assert loaded["grid"] == "balanced"
    canonical = b'{"grid":"balanced","layers":{"mid_block.attentions.0.proj_in":2,"up_blocks.1.resnets.0.conv1":1}}'
    assert loaded["hash"] == "sha256:" + hashlib.sha256(canonical).hexdigest()
    assert loaded["hash"] == "sha256:e5e448e2db1acb477dfbbff248aba87f70fdc578bf59d01c763c1513321cbd43"
    path.write_text('{"format": "bf.recipe", "version": 1, "layers": {"a": true}}')
    with pytest.raises(BfError, match=r"bit widths 1\.\.8"):
        load_recipe(path)


# ---- docs/FORMAT.md section 4: what a verifying reader rejects ------------------------------


def _put_field(buf: np.ndarray, bit: int, field_bits: int, value: int) -> None:
    for i in range(field_bits):
        byte, b = divmod(bit + i, 8)
        buf[byte] = (buf[byte] & ~np.uint8(1 << b)) | np.uint8(((value >> i) & 1) << b)


# "up.conv" is (3, 2, 3, 3) at 4 bits: 18 codes a row in 3 fields of 7 codes in 29 bits (the last holds 4 codes
# of the weight), 87 bits in R = 11 bytes (bit 7 of each row's last byte unused), 33 bytes of rows, 40 in all.
NONCONFORMING = {
    "padding byte": (lambda c: c.__setitem__(35, 1), "buffer padding byte 35 (after the last row, which ends at byte 33) is 0x01, not 0"),
    "unused bit": (lambda c: c.__setitem__(21, c[21] | 0x80), "row 1: unused bit 7 of its last byte (byte 21) not 0"),
    "padding code": (
        lambda c: _put_field(c, 8 * 11 * 2 + 58, 29, 17**4),
        "row 2: padding codes of its last field (field 2, holding 4 code(s) of the weight) are not 0 "
        "(the field holds 83521, not below 17^4 = 83521)",
    ),
    "field": (
        lambda c: _put_field(c, 8 * 11 + 29, 29, 17**7 + 5),
        "row 1 field 1 holds 410338678, not below 17^7 = 410338673 (a code of 17 or more)",
    ),
}


@pytest.mark.parametrize("kind", list(NONCONFORMING))
def test_reader_rejects_nonconforming_codes(tmp_path, kind):
    """Bytes no decoder reads, written non-zero by another writer: checksums pass, the code checks do not."""
    edit, problem = NONCONFORMING[kind]
    ckpt = make_checkpoint()
    codes = ckpt.layers["up.conv"].codes
    assert codes.size == 40
    edit(codes)
    path = tmp_path / "m.bfq"
    ckpt.save(path)
    with pytest.raises(FormatError) as e:
        Checkpoint.load(path)
    assert str(e.value) == f"{path}: layer 'up.conv' codes: {problem} (not as a conforming writer writes them); re-create the file"
    assert Checkpoint.load(path, verify=False).layers["up.conv"].codes.tobytes() == codes.tobytes()
