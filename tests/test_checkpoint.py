import json
import struct
from pathlib import Path

import numpy as np
import pytest

from bf.errors import BfError, FormatError
from bf.format import Bundle, Checkpoint, Grid, QuantizedLayer, read_header
from bf.format.checkpoint import FORMAT_VERSION, HEADER_KEY


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
        np.testing.assert_array_equal(back.bundle.tensors["text_encoder"]["emb.weight"], ckpt.bundle.tensors["text_encoder"]["emb.weight"])
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


def _rewrite_header(path, edit=None, raw_text=None):
    """Re-encode the safetensors header after ``edit(bf_header_dict)``, keeping the data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st_header = json.loads(raw[8 : 8 + n])
    if raw_text is None:
        bf_header = json.loads(st_header["__metadata__"][HEADER_KEY])
        edit(bf_header)
        raw_text = json.dumps(bf_header)
    st_header["__metadata__"][HEADER_KEY] = raw_text
    new = json.dumps(st_header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


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
