"""TensorBoard event files written without TensorBoard: CRC-32C, TFRecord framing, the Event fields."""

import os
import struct

import pytest

from bf.trainer.event_log import EventLog, crc32c, event, read_records, record


def _varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf):
    """(field number, wire type, value) of a protobuf message; a reader independent of the writer."""
    i, out = 0, []
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 1:
            v, i = buf[i : i + 8], i + 8
        elif wire == 5:
            v, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            v, i = buf[i : i + n], i + n
        else:
            raise AssertionError(f"wire type {wire}")
        out.append((num, wire, v))
    return out


def scalars_of(rec: bytes) -> tuple[int, dict[str, float]]:
    fields = _fields(rec)
    step = next(v for n, w, v in fields if n == 2)
    values = {}
    for n, _, summary in fields:
        if n == 5:
            for _, _, value in _fields(summary):
                f = dict((num, v) for num, _, v in _fields(value))
                values[f[1].decode()] = struct.unpack("<f", f[2])[0]
    return step, values


def test_crc32c_known_answers():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_record_framing_and_corruption(tmp_path):
    path = tmp_path / "e"
    data = event(1.5, 7, {"a/b": 0.25})
    path.write_bytes(record(data) + record(b"x" * 300))
    assert read_records(path) == [data, b"x" * 300]
    raw = bytearray(path.read_bytes())
    raw[20] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt record at byte 0"):
        read_records(path)


def test_event_fields_decode_with_an_independent_reader(tmp_path):
    log = EventLog(tmp_path / "logs")
    log.scalars(3, {"stage1/loss": 0.5, "stage1/noise": 1e-3})
    log.scalars(300, {"stage2/loss": 2.0})
    log.close()
    first, *rest = read_records(log.path)
    head = _fields(first)
    assert (3, 2, b"brain.Event:2") in head
    assert struct.unpack("<d", next(v for n, w, v in head if n == 1))[0] > 1.7e9  # wall time, seconds
    assert [scalars_of(r) for r in rest] == [(3, {"stage1/loss": 0.5, "stage1/noise": pytest.approx(1e-3)}), (300, {"stage2/loss": 2.0})]
    assert log.path.name.startswith("events.out.tfevents.")


def test_resume_keeps_one_record_per_step_survives_a_cut_file_and_leaves_other_runs_alone(tmp_path):
    logs = tmp_path / "logs"
    other = EventLog(logs, "other")  # another run in the same log directory
    other.scalars(1, {"loss": 9.0})
    other.close()
    first = EventLog(logs, "mine")
    for step in range(1, 6):
        first.scalars(step, {"loss": float(step)})
    first.close()
    second = EventLog(logs, "mine")  # a fresh run of "mine" replaces its file, not "other"'s
    for step in range(1, 5):
        second.scalars(step, {"loss": 10.0 + step})
    second.close()
    (older,) = [f for f in logs.iterdir() if f.name.endswith(".mine")]
    # an old-format second file of the same run (steps trained again), then a kill cut the last record
    newer = logs / (older.name.replace(".mine", "") + "x.mine")
    newer.write_bytes(record(event(2.0, 3, {"loss": 30.0})) + record(event(2.0, 4, {"loss": 40.0}))[:-3])
    os.utime(newer, (older.stat().st_mtime + 1,) * 2)
    resumed = EventLog(logs, "mine", resume_step=3)
    resumed.scalars(4, {"loss": 44.0})
    resumed.close()
    (mine,) = [f for f in logs.iterdir() if f.name.endswith(".mine")]
    assert [scalars_of(r) for r in read_records(mine)[1:]] == [
        (1, {"loss": 11.0}),
        (2, {"loss": 12.0}),
        (3, {"loss": 30.0}),
        (4, {"loss": 44.0}),
    ]
    assert [scalars_of(r) for r in read_records(other.path)[1:]] == [(1, {"loss": 9.0})]
