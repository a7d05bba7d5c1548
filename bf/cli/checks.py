"""Checks of command-line input that run before any expensive work, and parsers of list options.

Every failure is one line naming the option and what to do (a BfError or a click.BadParameter).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from bf.errors import BfError


def check_new_file(out: Path, force: bool) -> None:
    """--out is new (or --force) and its directory can be written (made if missing)."""
    if out.exists() and not force and not out.is_dir():
        raise BfError(f"{out} already exists; pass --force to replace it")
    check_writable_file(out)


def check_outputs(**outs: Path | None) -> None:
    """Every output file given (not None, not '-' for stdout) can be written.
    Keywords are option names without dashes (json_out= for --json)."""
    for option, out in outs.items():
        if out is not None and str(out) != "-":
            check_writable_file(out, "--" + option.removesuffix("_out").replace("_", "-"))


def check_writable_file(out: Path, option: str = "--out") -> None:
    """``out`` is not a directory, and the nearest existing directory above it can be written."""
    if out.is_dir():
        raise BfError(f"{option} {out} is a directory; give a file name")
    check_writable_parent(out, option)


def check_writable_parent(out: Path, option: str = "--out") -> None:
    parent = next(p for p in (out.parent.absolute(), *out.parent.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BfError(f"{option} {out}: {parent} is not a writable directory; choose another {option}")


def check_output_dir(out: Path) -> None:
    """--out of bf export: a directory that does not exist or is empty, under a writable one."""
    if out.exists() and not out.is_dir():
        raise BfError(f"--out {out} is a file; give a directory that does not exist or is empty")
    check_writable_parent(out)


def check_new_model_dir(out: Path) -> None:
    """--out of a command that writes a model directory: none there yet (or an empty one), under a writable directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BfError(f"--out {out} already exists; give a new directory for the model")
    check_writable_parent(out)


def check_png_out(out: Path) -> None:
    """bf infer writes PNG files into a directory that exists and can be written."""
    if out.suffix.lower() != ".png":
        raise BfError(f"--out {out}: bf infer writes PNG images; give a .png file name")
    if not out.parent.is_dir():  # unlike the other commands' --out, no directories are made for images
        raise BfError(f"--out {out}: directory {out.parent} does not exist; create it first")
    check_writable_file(out)


def check_torch_options(backend: str, compile_step: bool, fused: str | None, low_memory: bool) -> None:
    """bf infer's and bf bench's options of the torch backend alone, against --backend and each other."""
    if compile_step and backend != "torch":
        raise BfError(f"--compile applies to --backend torch, not {backend}")
    if fused not in (None, "off") and backend != "torch":
        raise BfError(f"--fused {fused} applies to --backend torch, not {backend}")
    if low_memory and backend != "torch":
        raise BfError(f"--low-memory applies to --backend torch, not {backend}")


def check_gpu_backend(backend: str) -> None:
    """Before any export or load: the GPU backends need a visible CUDA GPU."""
    from bf.runtime.cuda_runtime import gpu_count

    if backend in ("torch", "trt") and gpu_count() == 0:
        raise BfError(f"--backend {backend} runs on a CUDA GPU and none is visible here; use --backend ort")


def default_device(device: str | None) -> str:
    """--device: as given, else cuda when torch sees a GPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_bit_widths(text: str) -> tuple[int, ...]:
    """--bits of bf analyze: widths in 1..8, comma-separated (sorted, without repeats)."""
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated bit widths, e.g. 1,2,3", param_hint="--bits") from None
    if not bits or not all(1 <= b <= 8 for b in bits):
        raise click.BadParameter(f"{text!r}: widths must be in 1..8", param_hint="--bits")
    return bits


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """--batch of bf bench: batch sizes of at least 1, comma-separated (sorted, without repeats)."""
    try:
        batches = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated batch sizes, e.g. 1,2", param_hint="--batch") from None
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{text!r}: batch sizes must be at least 1", param_hint="--batch")
    return batches


def parse_guidance_scales(text: str) -> tuple[float, ...]:
    """--cfg of bf eval: guidance scales, comma-separated, each finite and at least 0 (order kept)."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint="--cfg") from None
    if not values or min(values) < 0 or not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{text!r}: give one or more finite guidance scales of at least 0", param_hint="--cfg")
    return values


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` of --lora (a path that exists as written is a path, colons and all)."""
    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).exists():
        return Path(text), 1.0
    try:
        value = float(scale)
    except ValueError:
        if path and Path(path).is_file():  # FILE:SCALE whose scale is not a number
            raise BfError(f"--lora {text}: the scale after the last ':' must be a number, as in {path}:0.8") from None
        return Path(text), 1.0  # not FILE:SCALE: a path, which the caller finds missing
    if not math.isfinite(value):
        raise BfError(f"--lora {text}: the scale must be a finite number")
    return Path(path), value


def parse_lora_args(texts) -> tuple[tuple[Path, float], ...]:
    """Every --lora FILE[:SCALE], each file there."""
    parsed = tuple(parse_lora_arg(t) for t in texts)
    for path, _ in parsed:
        if not path.is_file():
            raise BfError(f"--lora {path}: no such file")
    return parsed
