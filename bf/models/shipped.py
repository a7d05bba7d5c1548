"""The small text-to-image model that ships inside the package (the default model)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bf.errors import BfError

SHIPPED_NAME = "shapes-sd"


def shipped_model_dir() -> Path:
    path = Path(str(resources.files("bf.assets").joinpath(SHIPPED_NAME)))
    if not (path / "model_index.json").is_file():
        raise BfError(f"the shipped model is missing from this install ({path}); reinstall bf or pass --model DIR")
    return path


def model_source(arg: str | Path | None) -> Path:
    """A --model value: a path, or nothing / the word ``shipped`` for the shipped model."""
    if arg is None or str(arg) == "shipped":
        return shipped_model_dir()
    return Path(arg)
