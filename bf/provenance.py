"""What made an artifact: command line, versions, time. Stored in every output file."""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata

import bf

_command_args: list[str] | None = None  # set by the CLI for the command it runs; else this process's argv


def set_command(args: list[str] | None) -> None:
    """The command line the CLI is running (None when it returns)."""
    global _command_args
    _command_args = None if args is None else [str(a) for a in args]


def provenance(extra_packages: tuple[str, ...] = ("torch", "diffusers", "numpy", "safetensors")) -> dict:
    versions = {}
    for pkg in extra_packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": " ".join(["bf", *(sys.argv[1:] if _command_args is None else _command_args)]),
        "bf": bf.__version__,
        "python": platform.python_version(),
        "versions": versions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
