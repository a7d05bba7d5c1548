"""The small text-to-image model that ships inside the package (the default model)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bf.errors import BfError

SHIPPED_NAME = "shapes-sd"
# The shipped model trained with bf train's defaults and the 1.99-bit recipe (tools/shipped_bitsfusion_gpu.sh).
SHIPPED_BFQ_NAME = "shapes-sd-1.99bit.bfq"
SHIPPED_BFQ_WORD = "shipped-1.99bit"  # names it on the command line


def shipped_model_dir() -> Path:
    path = Path(str(resources.files("bf.assets").joinpath(SHIPPED_NAME)))
    if not (path / "model_index.json").is_file():
        raise BfError(f"the shipped model is missing from this install ({path}); reinstall bf or pass --model DIR")
    return path


def shipped_bfq() -> Path:
    """The shipped BitsFusion model: what bf infer and bf bench run without a target."""
    path = Path(str(resources.files("bf.assets").joinpath(SHIPPED_BFQ_NAME)))
    if not path.is_file():
        raise BfError(f"the shipped 1.99-bit model is missing from this install ({path}); reinstall bf or give a target")
    return path


def model_source(arg: str | Path | None) -> Path:
    """A --model value: a path, nothing / the word ``shipped`` for the shipped model, or ``shipped-1.99bit``
    for its shipped BitsFusion model."""
    if arg is None or str(arg) == "shipped":
        return shipped_model_dir()
    if str(arg) == SHIPPED_BFQ_WORD:
        return shipped_bfq()
    return Path(arg)
