"""What made an artifact: command line, versions, time. Stored in every output file."""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata

import bf


def provenance(extra_packages: tuple[str, ...] = ("torch", "diffusers", "numpy", "safetensors")) -> dict:
    versions = {}
    for pkg in extra_packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": " ".join(["bf", *sys.argv[1:]]),
        "bf": bf.__version__,
        "python": platform.python_version(),
        "versions": versions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
