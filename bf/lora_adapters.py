"""LoRA adapter files and the low-rank branch that runs one beside a UNet layer, ``layer(x) + scale * up(down(x))``.

``bf export --lora`` traces the branches into standard MatMul / Conv nodes, so every runtime runs them; the torch
backend (``bf infer --lora``) builds each low-bit weight anew from the codes on every call, and adds the LoRAs to
those weights where it builds them (``up @ down``; ``LoRAHooks.take_weight_deltas``): its compiled step with one
batched product per run of same-shaped layers, its streamed ring in the slot right after each decode, on the
decoding stream. Branches it cannot add that way (an up projection wider than 1x1, layers decoded once and kept,
layers on the fused kernel) are hooked beside their layers. Either way the low-bit layer stays packed codes and no
dense copy of a weight is kept. The files are read by diffusers' own LoRA reader (``StableDiffusionPipeline.lora_state_dict``:
diffusers', peft's and kohya's formats), so ``--lora`` takes what ``pipe.load_lora_weights`` takes. A branch's scale is
the user's times alpha / rank (the file's network alphas, or its adapter metadata; 1 without either).
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch
from torch import nn

from bf.errors import BfError
from bf.models.added_condition import has_added_embedding
from bf.module_paths import parent_and_attribute

_DOWN_UP = (("lora_A", "lora_B"), ("lora.down", "lora.up"), ("lora_down", "lora_up"))


def _low_rank(down: torch.Tensor, up: torch.Tensor, conv: dict | None) -> tuple[nn.Module, nn.Module]:
    """The down and up layers holding ``down`` and ``up``: convolutions beside a convolution (down with its kernel,
    stride and padding), matrix products beside a linear layer."""
    rank = down.shape[0]
    if conv is not None:
        d = nn.Conv2d(down.shape[1], rank, tuple(down.shape[2:]), conv["stride"], conv["padding"], conv["dilation"], bias=False)
        u = nn.Conv2d(rank, up.shape[0], tuple(up.shape[2:]), bias=False)
    else:
        d, u = nn.Linear(down.shape[1], rank, bias=False), nn.Linear(rank, up.shape[0], bias=False)
    with torch.no_grad():
        d.weight.copy_(down.reshape(d.weight.shape))
        u.weight.copy_(up.reshape(u.weight.shape))
    return d, u


class LoRABranch(nn.Module):
    """``base(x) + scale * up(down(x))`` (the down and up layers: _low_rank)."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float, conv: dict | None):
        super().__init__()
        self.base, self.scale = base, float(scale)
        self.down, self.up = _low_rank(down, up, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))


# The module of an adapter key (under "unet.", ".weight" cut) and which half it is: peft's and diffusers' names, and
# the attention-processor names diffusers gives kohya's and older files.
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<half>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)"
                  r"|processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<phalf>down|up))$")  # fmt: skip
_DOWN = {"lora_A", "lora.down", "lora_down", "down"}
# computed into the export's time-feature table: the time embedding, and (without SDXL's added embedding) the ResBlocks'
# time projections
_TIME = re.compile(r"(^|\.)(time_embedding)(\.|$)")
_TIME_PROJ = re.compile(r"(^|\.)(time_emb_proj)(\.|$)")


def _module_and_half(key: str) -> tuple[str, str] | None:
    m = _KEY.match(key)
    if m is None:
        return None
    if m["proj"]:
        module = f"{m['module']}.{m['proj']}" + (".0" if m["proj"] == "to_out" else "")
        return module, "down" if m["phalf"] in _DOWN else "up"
    return m["module"], "down" if m["half"] in _DOWN else "up"


def read_lora(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """The UNet's adapters of a LoRA file: module name -> (down, up) weights, and module name -> alpha / rank
    (alpha / sqrt(rank) for rsLoRA). Anything under ``unet.`` that is not such a weight or its alpha is refused."""
    from diffusers import StableDiffusionPipeline

    if not path.is_file():
        raise BfError(f"--lora {path}: no such file")
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as e:  # diffusers' reader: an unreadable or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BfError(f"--lora {path}: not a LoRA diffusers can read ({first})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith("unet."):
            continue
        found = _module_and_half(key[len("unet.") :].removesuffix(".weight")) if key.endswith(".weight") else None
        if found is None:
            raise BfError(f"--lora {path}: {key} is no LoRA down or up weight bf can place (DoRA, biases and "
                          "other adapter types are not supported)")  # fmt: skip
        pairs.setdefault(found[0], {})[found[1]] = tensor.float()
    if not pairs:
        raise BfError(f"--lora {path}: no UNet adapters in it (a LoRA for another model, or for the text encoder only?)")
    broken = [m for m, p in pairs.items() if set(p) != {"down", "up"}]
    if broken:
        raise BfError(f"--lora {path}: {broken[0]} has a down or an up weight but not both")
    time = [m for m in pairs if _TIME.search(m)]
    if time:
        _refuse_time_layer(path, time[0])
    meta = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()} if isinstance(metadata, dict) else {}
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise BfError(f"--lora {path}: per-layer ranks or alphas (rank_pattern / alpha_pattern) are not supported")
    file_alphas: dict[str, float] = {}
    for key, value in (alphas or {}).items():
        found = _module_and_half(key.removeprefix("unet.").removesuffix(".alpha").removesuffix(".weight"))
        name = found[0] if found else key.removeprefix("unet.").removesuffix(".alpha")
        file_alphas[name] = float(value)
    ratios = {}
    for module, p in pairs.items():
        rank = p["down"].shape[0]
        alpha = file_alphas.get(module, meta.get("lora_alpha"))
        denominator = math.sqrt(rank) if meta.get("use_rslora") else rank
        ratios[module] = float(alpha) / denominator if alpha is not None else 1.0
    return {m: (p["down"], p["up"]) for m, p in pairs.items()}, ratios


def _refuse_time_layer(path: Path, module: str) -> None:
    raise BfError(
        f"--lora {path}: {module} is a time-embedding layer, which the export computes into its time-feature "
        "table; a LoRA there is not supported"
    )


def _check_fit(what: str, module: str, down: torch.Tensor, up: torch.Tensor, layer: nn.Module) -> None:
    """One line if ``down`` / ``up`` do not map the features ``layer`` maps (a layer of unknown shape passes)."""
    shape = _layer_shape(layer)
    if shape is not None and (shape[0] != up.shape[0] or shape[1] != down.shape[1]):
        raise BfError(f"{what}: {module} maps {down.shape[1]} to {up.shape[0]} features, the layer {shape[1]} to {shape[0]}")


def check_adapter_keys(model: nn.Module, state: dict, what: str) -> None:
    """One line for an adapter state dict (module-relative keys, peft's or diffusers' names) that does not fit
    ``model``: a key that names no LoRA weight, a layer the model has not (a LoRA for another architecture), a down
    and up of different ranks, or shapes that are not the layer's."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.endswith(".weight") or ".lora_magnitude_vector" in key:
            continue
        base = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", key)  # peft's per-adapter names
        found = _module_and_half(base.removesuffix(".weight"))
        if found is not None:
            pairs.setdefault(found[0], {})[found[1]] = tensor
    if not pairs:
        raise BfError(f"{what}: no LoRA weights for this model in it (a LoRA for another model, or the text encoder only?)")
    for module, p in pairs.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise BfError(f"{what}: {module} matches no layer of this {type(model).__name__} (a LoRA for another architecture?)") from None
        if set(p) != {"down", "up"}:
            raise BfError(f"{what}: {module} has a down or an up weight but not both")
        down, up = p["down"], p["up"]
        if down.shape[0] != up.shape[1]:
            raise BfError(f"{what}: {module}'s down weight has rank {down.shape[0]}, its up weight {up.shape[1]}")
        _check_fit(what, module, down, up, layer)


def _placed(unet: nn.Module, loras: list[tuple[Path, float]], read: dict | None) -> list[tuple]:
    """Every adapter of ``loras`` (file, scale) checked against its layer of ``unet``: (index of its entry in ``loras``,
    layer name, down, up, scale, convolution geometry or None for a linear layer)."""
    placed = []
    added = has_added_embedding(unet)  # SDXL: its time projections also see the prompt
    for i, (path, scale) in enumerate(loras):
        weights, ratios = (read or {}).get(path) or read_lora(path)
        for module, (down, up) in weights.items():
            if not added and _TIME_PROJ.search(module):
                _refuse_time_layer(path, module)
            try:
                parent, child = parent_and_attribute(unet, module)
                base = getattr(parent, child)
            except AttributeError:
                raise BfError(f"--lora {path}: {module} matches no layer of this UNet (a LoRA for another architecture?)") from None
            conv = {k: getattr(_innermost(base), k) for k in ("stride", "padding", "dilation")} if down.dim() == 4 else None
            _check_fit(f"--lora {path}", module, down, up, _innermost(base))
            placed.append((i, module, down, up, scale * ratios[module], conv))
    return placed


def _applied(loras: list[tuple[Path, float]], placed: list) -> list[dict]:
    """What was applied, one entry per (file, scale) given (a file given twice is applied twice)."""
    return [{"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "scale": scale,
             "layers": sum(1 for p in placed if p[0] == i)} for i, (path, scale) in enumerate(loras)]  # fmt: skip


def apply_loras(unet: nn.Module, loras: list[tuple[Path, float]], read: dict | None = None) -> list[dict]:
    """Every adapter of ``loras`` (file, scale) as a branch beside its layer of ``unet`` (LoRABranch, in place: what an
    export traces); what was applied. ``read``: the files already read (read_lora), by path."""
    placed = _placed(unet, loras, read)
    for _, module, down, up, scale, conv in placed:
        parent, child = parent_and_attribute(unet, module)
        setattr(parent, child, LoRABranch(getattr(parent, child), down, up, scale, conv))
    return _applied(loras, placed)


class LoRAHook(nn.Module):
    """A low-rank branch added to its layer's output by a forward hook, ``layer(x) + scale * up(down(x))``, for a
    runtime that swaps the layer itself (streamed or compiled weights) and finds it by name: the layer stays where
    it is, under its name."""

    def __init__(self, layer: str, down: torch.Tensor, up: torch.Tensor, scale: float, conv: dict | None):
        super().__init__()
        self.layer, self.scale = layer, float(scale)
        self.down, self.up = _low_rank(down, up, conv)

    def forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.scale * self.up(self.down(args[0]))

    def weight_delta(self, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up * scale, down)`` as matrices, (out, rank) and (rank, k), whose product is what the branch adds to
        the layer's weight flattened as it is stored (``channels_last``: a convolution's (out, kh, kw, in)). None
        where the branch is not a change of the weight: an up projection wider than 1x1."""
        up, down = self.up.weight, self.down.weight
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            return None
        if down.dim() == 4 and channels_last:
            down = down.permute(0, 2, 3, 1)
        return (up.reshape(up.shape[0], -1) * self.scale).contiguous(), down.reshape(down.shape[0], -1).contiguous()


class LoRAHooks(nn.Module):
    """The LoRA branches of a UNet as forward hooks (LoRAHook), checked against the UNet's layers when built;
    ``register`` hooks them onto the layers of that name, wherever the runtime has put them by then."""

    def __init__(self, unet: nn.Module, loras: list[tuple[Path, float]], read: dict | None = None):
        super().__init__()
        placed = _placed(unet, loras, read)
        self.hooks = nn.ModuleList(LoRAHook(module, down, up, scale, conv) for _, module, down, up, scale, conv in placed)
        self.applied = _applied(loras, placed)
        self._handles: list = []
        self._in_weights: set[int] = set()  # the hooks whose branch a layer's weight carries (take_weight_deltas)

    def take_weight_deltas(self, layers: dict[str, bool]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The branches on ``layers`` (name -> whether its weight is stored channels-last) as changes of the weight,
        one per layer: ``(up, down)`` with ``up @ down`` the change (several adapters' ranks side by side). A runtime
        that builds a layer's weight anew on every call adds them there, one batched product per group of
        same-shaped layers instead of two matrix products per layer on the activations; those branches are then
        not hooked (``register``)."""
        deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, hook in enumerate(self.hooks):
            if hook.layer not in layers or (d := hook.weight_delta(layers[hook.layer])) is None:
                continue
            if hook.layer in deltas:
                up, down = deltas[hook.layer]
                d = (torch.cat([up, d[0]], 1), torch.cat([down, d[1]], 0))
            deltas[hook.layer] = d
            self._in_weights.add(i)
        return deltas

    @property
    def counts(self) -> dict[str, int]:
        """How the branches run: added to their layers' weights, or hooked (registered so far)."""
        return {"in_weights": len(self._in_weights), "hooked": len(self._handles)}

    def register(self, unet: nn.Module) -> None:
        for i, hook in enumerate(self.hooks):
            if i not in self._in_weights:
                self._handles.append(unet.get_submodule(hook.layer).register_forward_hook(hook))


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, LoRABranch):
        module = module.base
    return module


def _layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) features of a layer: a plain Conv2d / Linear, or an export low-bit module (its packed weight's)."""
    shape = module.weight_op.shape if hasattr(module, "weight_op") else getattr(getattr(module, "weight", None), "shape", None)
    return None if shape is None else (shape[0], shape[1] * getattr(module, "groups", 1))
