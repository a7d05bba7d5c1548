"""The ``bitsfusion`` quantization config: what ``unet/config.json`` holds under ``quantization_config``."""

from __future__ import annotations

import copy
import json
from enum import Enum

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from bf.errors import BfError
from bf.format import Grid


class QuantMethod(str, Enum):
    """diffusers reads ``quant_method.value``; a str enum also compares and hashes as the plain name."""

    BITSFUSION = "bitsfusion"


QUANT_METHOD = QuantMethod.BITSFUSION


class BitsFusionConfig(QuantizationConfigMixin):
    """``layers``: each quantized layer by module name, ``{"shape": [...], "bits": b, "grid": "balanced"|"plain"}``
    (what its packed codes and scales are); ``keep_decoded``: decode each weight once, at its first call, and keep
    it (speed for memory) instead of decoding it on every call."""

    def __init__(self, layers: dict | None = None, keep_decoded: bool = False, **kwargs):
        self.quant_method = QUANT_METHOD
        self.layers = {name: _layer(name, spec) for name, spec in (layers or {}).items()}
        self.keep_decoded = bool(keep_decoded)
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise BfError(f"a bitsfusion quantization_config has no {', '.join(unknown)}; is the model from a newer bf?")

    def grid(self, name: str) -> Grid:
        spec = self.layers[name]
        return Grid(spec["bits"], spec["grid"])

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD.value, "keep_decoded": self.keep_decoded, "layers": copy.deepcopy(self.layers)}

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), sort_keys=True)[:300]}"


def _layer(name: str, spec) -> dict:
    try:
        out = {"shape": [int(d) for d in spec["shape"]], "bits": int(spec["bits"]), "grid": str(spec["grid"])}
        Grid(out["bits"], out["grid"])
    except (KeyError, TypeError, ValueError) as e:
        raise BfError(f"bitsfusion quantization_config: layer {name} is not {{shape, bits, grid}} ({e})") from None
    return out
