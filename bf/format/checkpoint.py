"""The packed checkpoint (``.bfq``): one safetensors file, layout in docs/FORMAT.md.

Only this module reads or writes ``.bfq`` files. Loading validates the format name
and version, the header's JSON, the header's and every tensor's SHA-256, every shape and
every layer's packed codes (docs/FORMAT.md section 2, "What a reader checks"), and reports
any problem as a one-line :class:`~bf.errors.FormatError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bf.atomic import atomic_path
from bf.errors import BfError, FormatError
from bf.format.grid import Grid
from bf.format.packing import Packing, pack_codes, packed_problem, unpack_codes

FORMAT_NAME = "bf.bfq"
FORMAT_VERSION = 1
HEADER_KEY = "bf"  # safetensors metadata key holding the JSON header
HEADER_SHA_KEY = "header_sha256"  # bf header key: checksum of the rest of the header

_LAYER_PREFIX = "layer/"
_UNET_PREFIX = "unet/"
_BUNDLE_PREFIX = "bundle/"
_BUNDLE_FILE_PREFIX = "bundle_file/"


@dataclass
class QuantizedLayer:
    """One quantized weight: packed codes and a float32 scale per output channel."""

    name: str
    shape: tuple[int, ...]
    grid: Grid
    codes: np.ndarray  # uint8, packed as Packing.for_grid(grid)
    scale: np.ndarray  # float32, (shape[0],)

    @property
    def packing(self) -> Packing:
        return Packing.for_grid(self.grid)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stored_bytes(self) -> int:
        return int(self.codes.nbytes + self.scale.nbytes)

    @staticmethod
    def stored_bytes_for(shape: tuple[int, ...], grid: Grid) -> int:
        """What ``stored_bytes`` will be for a weight of this shape: packed codes and fp32 scales."""
        return Packing.for_grid(grid).nbytes(shape) + 4 * int(shape[0])

    @classmethod
    def from_levels(cls, name: str, levels: np.ndarray, scale: np.ndarray, grid: Grid) -> QuantizedLayer:
        """Pack integer levels (qmin..qmax) of a weight with its per-channel scales."""
        levels = np.asarray(levels)
        if np.issubdtype(levels.dtype, np.floating):
            if np.any(levels != np.rint(levels)):  # NaN too: truncating would store a level nobody computed
                raise ValueError(f"{name}: levels must be integers, got fractional values")
        elif not np.issubdtype(levels.dtype, np.integer):
            raise ValueError(f"{name}: levels must be integers, got {levels.dtype}")
        if levels.size and (levels.min() < grid.qmin or levels.max() > grid.qmax):
            raise ValueError(f"{name}: levels outside [{grid.qmin}, {grid.qmax}]")
        scale = np.asarray(scale, dtype=np.float32).reshape(-1)
        if scale.shape != (levels.shape[0],):
            raise ValueError(f"{name}: {scale.size} scales for {levels.shape[0]} output channels")
        codes = pack_codes((levels.astype(np.int32) - grid.qmin), Packing.for_grid(grid))
        return cls(name=name, shape=tuple(int(d) for d in levels.shape), grid=grid, codes=codes, scale=scale)

    def levels(self) -> np.ndarray:
        return unpack_codes(self.codes, self.shape, self.packing).astype(np.int16) + np.int16(self.grid.qmin)

    def dequantize(self) -> np.ndarray:
        """The weight the model computes with: ``scale[o] * level`` in float32."""
        bshape = (-1,) + (1,) * (len(self.shape) - 1)
        return self.levels().astype(np.float32) * self.scale.reshape(bshape)


@dataclass
class Bundle:
    """Text encoder and VAE weights (fp16) plus the base model's small files."""

    files: dict[str, bytes]  # relative path in a diffusers directory -> content
    tensors: dict[str, dict[str, np.ndarray]]  # component -> parameter name -> fp16 array


@dataclass
class Checkpoint:
    """A quantized UNet and everything needed to rebuild and deploy it."""

    unet_config: dict
    layers: dict[str, QuantizedLayer]
    tensors: dict[str, np.ndarray]  # every unquantized UNet tensor, by parameter name
    base_model: dict  # {"path": str, "hash": str}
    recipe: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    bundle: Bundle | None = None

    def unet_state_dict(self) -> dict[str, np.ndarray]:
        """Full UNet state dict in float32 with dequantized weights."""
        out = {f"{name}.weight": layer.dequantize() for name, layer in self.layers.items()}
        out.update({k: v.astype(np.float32) for k, v in self.tensors.items()})
        return out

    # -- writing -----------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: the target is either the old file or the complete new one."""
        arrays: dict[str, np.ndarray] = {}
        layer_records = []
        for name, layer in self.layers.items():
            arrays[f"{_LAYER_PREFIX}{name}/codes"] = np.ascontiguousarray(layer.codes, dtype=np.uint8)
            arrays[f"{_LAYER_PREFIX}{name}/scale"] = np.ascontiguousarray(layer.scale, dtype=np.float32)
            layer_records.append(
                {
                    "name": name,
                    "shape": list(layer.shape),
                    "grid": layer.grid.to_json(),
                    "packing": layer.packing.to_json(),
                }
            )
        for k, v in self.tensors.items():
            arrays[_UNET_PREFIX + k] = np.ascontiguousarray(v)
        bundle_meta = None
        if self.bundle is not None:
            for comp, params in self.bundle.tensors.items():
                for k, v in params.items():
                    arrays[f"{_BUNDLE_PREFIX}{comp}/{k}"] = np.ascontiguousarray(v)
            for rel, content in self.bundle.files.items():
                arrays[_BUNDLE_FILE_PREFIX + rel] = np.frombuffer(content, dtype=np.uint8).copy()
            bundle_meta = {"components": sorted(self.bundle.tensors), "files": sorted(self.bundle.files)}
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "unet_config": self.unet_config,
            "layers": layer_records,
            "unet_tensors": list(self.tensors),
            "base_model": self.base_model,
            "recipe": self.recipe,
            "provenance": self.provenance,
            "bundle": bundle_meta,
            "checksums": {k: _sha256(v) for k, v in arrays.items()},
        }
        header = json.loads(json.dumps(header))  # hash exactly what a reader parses back (tuples as lists, keys as strings)
        where = _non_finite(header)
        if where is not None:  # JSON has no NaN or infinity, so no reader outside Python could parse the header
            raise BfError(f"{path}: not written: header value {where} is not a finite number (JSON has none); pass finite settings")
        header[HEADER_SHA_KEY] = _header_sha256(header)
        from safetensors.numpy import save_file

        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp), metadata={HEADER_KEY: json.dumps(header), "format": FORMAT_NAME})

    # -- reading -----------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Checkpoint:
        """Read and validate a ``.bfq``; any problem is a FormatError naming the file."""
        path = Path(path)
        header, arrays = _read_safetensors(path)
        try:
            return _from_parts(path, header, arrays, verify)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(Infinity)
            raise FormatError(f"{path}: malformed header ({type(e).__name__}: {e}); re-create the file") from None


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .bfq (format and version checked) without reading tensors."""
    header, _ = _read_safetensors(Path(path), with_tensors=False)
    return header


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BfError(f"{path}: no such file; create one with 'bf quantize ... --out {path.name}'")
    if not path.is_file():
        raise BfError(f"{path}: is not a file")


def _unreadable(path: Path, e: Exception) -> FormatError:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return FormatError(f"{path}: not a readable .bfq file (truncated or corrupt: {detail}); re-create it with 'bf quantize'")


def _parse_header(path: Path, meta: dict) -> dict:
    if meta.get("format") != FORMAT_NAME or HEADER_KEY not in meta:
        raise FormatError(f"{path}: not a bf checkpoint (no '{FORMAT_NAME}' header); pass a file written by 'bf quantize'")
    try:
        header = json.loads(meta[HEADER_KEY], object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: corrupt header ({e.msg} at byte {e.pos}); re-create the file") from None
    except _DuplicateKeyError as e:
        why = "readers differ in which they keep"
        raise FormatError(f"{path}: header has the key {e} twice in one object ({why}); re-create the file") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt header (not a JSON object); re-create the file")
    where = _non_finite(header)
    if where is not None:
        raise FormatError(f"{path}: header value {where} is not a finite number (JSON has no NaN or infinity); re-create the file")
    version = header.get("format_version")
    if not isinstance(version, int):
        raise FormatError(f"{path}: header has no format version; re-create the file")
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: written in .bfq format {version} by a newer bf; this bf reads format {FORMAT_VERSION}: upgrade bf")
    if version < FORMAT_VERSION:
        raise FormatError(
            f"{path}: .bfq format {version} is no longer read (this bf reads format {FORMAT_VERSION}); re-create it with 'bf quantize'"
        )
    return header


def _read_safetensors(path: Path, with_tensors: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    _check_file(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            header = _parse_header(path, meta)
            arrays = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}  # noqa: SIM118 (safe_open is no dict)
    except BfError:
        raise
    except Exception as e:  # safetensors' own error type (truncated buffer, bad offsets)
        raise _unreadable(path, e) from None
    return header, arrays


def _from_parts(path: Path, header: dict, arrays: dict[str, np.ndarray], verify: bool) -> Checkpoint:
    if verify and header.get(HEADER_SHA_KEY) != _header_sha256(header):
        raise FormatError(f"{path}: header checksum mismatch (file corrupted); re-create or re-copy it")
    checksums = header["checksums"]
    if set(checksums) != set(arrays):
        missing = sorted(set(checksums) - set(arrays))
        extra = sorted(set(arrays) - set(checksums))
        raise FormatError(f"{path}: tensors do not match the header (missing {missing[:3]}, unexpected {extra[:3]})")
    if verify:
        for k, v in arrays.items():
            if _sha256(v) != checksums[k]:
                raise FormatError(f"{path}: checksum mismatch in tensor '{k}' (file corrupted); re-create or re-copy it")
    layers = {}
    for rec in header["layers"]:
        name, shape = rec["name"], tuple(int(d) for d in rec["shape"])
        grid = Grid.from_json(rec["grid"])
        packing = Packing.for_grid(grid)
        # Compare the raw record: building a Packing from it first could compute L**K of an absurd K.
        if rec["packing"] != packing.to_json():
            raise FormatError(
                f"{path}: layer '{name}' uses packing {json.dumps(rec['packing'])}, which format {FORMAT_VERSION} does not define "
                f"for {grid.kind} {grid.bits}-bit layers"
            )
        codes = arrays[f"{_LAYER_PREFIX}{name}/codes"]
        scale = arrays[f"{_LAYER_PREFIX}{name}/scale"]
        if codes.dtype != np.uint8 or codes.shape != (packing.nbytes(shape),):
            expected = f"uint8[{packing.nbytes(shape)}] for shape {list(shape)}"
            raise FormatError(f"{path}: layer '{name}' codes are {codes.dtype}{list(codes.shape)}, expected {expected}")
        if scale.dtype != np.float32 or scale.shape != (shape[0],):
            raise FormatError(f"{path}: layer '{name}' scale is {scale.dtype}{list(scale.shape)}, expected float32[{shape[0]}]")
        problem = packed_problem(codes, shape, packing) if verify else None
        if problem is not None:
            raise FormatError(f"{path}: layer '{name}' codes: {problem} (not as a conforming writer writes them); re-create the file")
        layers[name] = QuantizedLayer(name=name, shape=shape, grid=grid, codes=codes, scale=scale)
    tensors = {k: arrays[_UNET_PREFIX + k] for k in header["unet_tensors"]}
    bundle = None
    if header.get("bundle"):
        meta = header["bundle"]
        tensors_by_comp: dict[str, dict[str, np.ndarray]] = {c: {} for c in meta["components"]}
        for k, v in arrays.items():
            if k.startswith(_BUNDLE_PREFIX):
                comp, _, pname = k[len(_BUNDLE_PREFIX) :].partition("/")
                tensors_by_comp[comp][pname] = v
        files = {rel: arrays[_BUNDLE_FILE_PREFIX + rel].tobytes() for rel in meta["files"]}
        bundle = Bundle(files=files, tensors=tensors_by_comp)
    return Checkpoint(
        unet_config=header["unet_config"],
        layers=layers,
        tensors=tensors,
        base_model=header["base_model"],
        recipe=header.get("recipe") or {},
        provenance=header.get("provenance") or {},
        bundle=bundle,
    )


class _DuplicateKeyError(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKeyError(repr(k))
        out[k] = v
    return out


def _non_finite(value, where: str = "") -> str | None:
    """Where the first NaN or infinity in a parsed JSON value is (e.g. ``layers[0].shape[1]``), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} = {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else k)
        if found is not None:
            return found
    return None


def _sha256(a: np.ndarray) -> str:
    """Checksum of dtype, shape and bytes: an edited dtype or shape with the same bytes must not pass."""
    h = hashlib.sha256(f"{a.dtype.str}|{list(a.shape)}|".encode())
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _header_sha256(header: dict) -> str:
    """Checksum of the bf header without its own key, as canonical JSON (docs/FORMAT.md section 2)."""
    rest = {k: v for k, v in header.items() if k != HEADER_SHA_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
