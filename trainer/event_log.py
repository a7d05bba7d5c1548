"""Scalars in TensorBoard's event-file format, without TensorBoard or protobuf installed.

An event file is a TFRecord stream of ``Event`` protobufs; the few fields a scalar needs are
written by hand here, so ``tensorboard --logdir`` reads the losses of a run made on a
machine that has neither package (training machines rarely need them).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, scalars: dict[str, float] | None = None, file_version: str | None = None) -> bytes:
    """One serialized ``Event``: wall_time (1, double), step (2), file_version (3), summary (5)."""
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v))) for tag, v in scalars.items()
        )
        msg += _field_bytes(5, values)
    return msg


def record(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(length)) + data + struct.pack("<I", _masked(data))


def read_records(path: Path, strict: bool = True) -> list[bytes]:
    """The records of an event file, CRCs checked. ``strict=False`` stops at the first short or damaged
    record (a file cut by a kill or a full disk) instead of raising."""
    buf, out, i = path.read_bytes(), [], 0
    while i < len(buf):
        try:
            (n,) = struct.unpack_from("<Q", buf, i)
            if struct.unpack_from("<I", buf, i + 8)[0] != _masked(buf[i : i + 8]):
                raise ValueError(f"{path}: corrupt record length at byte {i}")
            data = buf[i + 12 : i + 12 + n]
            if len(data) != n or struct.unpack_from("<I", buf, i + 12 + n)[0] != _masked(data):
                raise ValueError(f"{path}: corrupt record at byte {i}")
        except (ValueError, struct.error):
            if strict:
                raise
            break
        out.append(data)
        i += 16 + n
    return out


def record_step(data: bytes) -> int | None:
    """The step of an ``Event`` as :func:`event` writes it (wall_time, then step), else None."""
    if len(data) < 11 or data[0] != 0x09 or data[9] != 0x10:
        return None
    step, shift = 0, 0
    for b in data[10:]:
        step |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return step
    return None


class EventLog:
    """Appends scalars to this run's ``events.out.tfevents.*.<run>`` file in ``log_dir``.

    ``run`` names the run (bf train: its work directory), so runs sharing a log directory, as
    TensorBoard's layout of one parent directory has them, never touch each other's files.
    ``resume_step``: a resumed run continues its file instead of starting a second one (TensorBoard
    would draw both): records after that step, which the run trains again, are dropped, one record
    is kept per step (the latest), and the run's earlier files are merged into the one it appends to.
    A fresh run removes its earlier files, as it rewrites log.csv."""

    def __init__(self, log_dir: Path, run: str = "run", resume_step: int | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = log_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{run}"
        kept = {0: record(event(now, 0, file_version="brain.Event:2"))}
        old = sorted(log_dir.glob(f"events.out.tfevents.*.{run}"), key=lambda f: f.stat().st_mtime)
        if resume_step is not None and old:
            self.path = old[-1]
            for f in old:  # later files win: they hold the steps trained again
                for data in read_records(f, strict=False):
                    step = record_step(data)
                    if step is not None and step <= resume_step:
                        kept[step] = record(data)
        from bf.atomic import atomic_path

        with atomic_path(self.path) as tmp:
            tmp.write_bytes(b"".join(kept[k] for k in sorted(kept)))
        for f in old:
            if f != self.path:
                f.unlink()
        self.f = open(self.path, "ab")  # noqa: SIM115 - kept open for the whole run

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.f.write(record(event(time.time(), step, values)))
        self.f.flush()

    def close(self) -> None:
        self.f.close()
