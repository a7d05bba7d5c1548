"""PNG output without an imaging library: 8-bit RGB, generation parameters as tEXt chunks."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from bf.atomic import atomic_path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(rgb: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)  # filter type 0 per row
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():  # tEXt is Latin-1; anything else goes in as iTXt (UTF-8)
        try:
            out += _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
        except UnicodeEncodeError:
            out += _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))
    return out + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b"")


def write_png(path: Path, rgb: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Written to a temporary file beside ``path``, then renamed: never half a file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(png_bytes(rgb, text))
