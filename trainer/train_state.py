"""Resumable training state in one safetensors file (no pickle): model and optimizer
tensors, plus a JSON header with the stage, step, configuration hash and the optimizer's
non-tensor settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bf.atomic import atomic_path
from bf.errors import BfError

STATE_FORMAT = "bf.train-state"
STATE_VERSION = 1


def save_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    scalars = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{idx}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{k}"] = v
    header = {"format": STATE_FORMAT, "version": STATE_VERSION, "meta": meta, "param_groups": osd["param_groups"], "scalars": scalars}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bf": json.dumps(header)})


def load_state(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer in place; returns the saved ``meta``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("bf", "{}"))
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as e:
        raise BfError(f"{path}: not a readable training state ({e}); delete it to start over") from None
    if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
        raise BfError(f"{path}: not a bf training state of version {STATE_VERSION}; delete it to start over")
    model_sd = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    if missing or unexpected:
        raise BfError(f"{path}: the saved model does not match this run ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, idx, name = k.split("/", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in header["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    return header["meta"]
