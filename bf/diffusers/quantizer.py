"""The ``bitsfusion`` quantizer diffusers calls while it loads a model whose config names that method.

Before the weights load, every layer the config lists becomes a LowBitLayer whose codes and scale are meta
buffers of the stored shapes and dtypes; while they load, those two tensors are claimed and put in place as they
are in the file (diffusers would cast the float32 scales to the model's dtype); nothing is left to do after.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from diffusers.quantizers.base import DiffusersQuantizer

from bf.diffusers.config import QUANT_METHOD, BitsFusionConfig
from bf.diffusers.layers import LowBitLayer, low_bit_layer
from bf.errors import BfError
from bf.module_paths import parent_and_attribute

SUPPORTED_DIFFUSERS = ((0, 42), (0, 43))  # [from, to): the versions whose quantizer hooks this is written against


class BitsFusionQuantizer(DiffusersQuantizer):
    requires_calibration = True  # a bitsfusion model is quantized by bf train / bf quantize, not while loading
    use_keep_in_fp32_modules = False

    def validate_environment(self, *args, **kwargs) -> None:
        import diffusers

        version = tuple(int(x) for x in diffusers.__version__.split(".")[:2])
        if not SUPPORTED_DIFFUSERS[0] <= version < SUPPORTED_DIFFUSERS[1]:
            lo, hi = (".".join(map(str, v)) for v in SUPPORTED_DIFFUSERS)
            raise BfError(f"bitsfusion models load with diffusers >={lo},<{hi}; this is {diffusers.__version__}")
        if importlib.util.find_spec("accelerate") is None:
            raise BfError("diffusers loads bitsfusion models through accelerate: pip install 'bf[train]' (or accelerate)")

    def _process_model_before_weight_loading(self, model, **kwargs):
        cfg: BitsFusionConfig = self.quantization_config
        for name, spec in cfg.layers.items():
            try:
                parent, child = parent_and_attribute(model, name)
                module = getattr(parent, child)
            except AttributeError:
                raise BfError(f"bitsfusion quantization_config names layer {name}, which this {type(model).__name__} has not") from None
            expected = tuple(module.weight.shape)
            if expected != tuple(spec["shape"]):
                raise BfError(f"bitsfusion layer {name} holds a {tuple(spec['shape'])} weight, the model's is {expected}")
            setattr(parent, child, low_bit_layer(module, expected, cfg.grid(name), cfg.keep_decoded, device="meta"))
        # enable_layerwise_casting would store the layers' float32 scales in its storage dtype: it skips them by name
        names = "|".join(re.escape(n) for n in cfg.layers)
        model._skip_layerwise_casting_patterns = (*(type(model)._skip_layerwise_casting_patterns or ()), f"^(?:{names})$")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = [n for n, m in model.named_modules() if isinstance(m, LowBitLayer) and (m.codes.is_meta or m.scale.is_meta)]
        if missing:
            raise BfError(f"the checkpoint has no packed codes and scales for {len(missing)} bitsfusion layer(s), e.g. "
                          f"{missing[0]}.codes; write the directory with bf to-diffusers")  # fmt: skip
        return model

    def check_if_quantized_param(self, model, param_value, param_name: str, state_dict, **kwargs) -> bool:
        module, tensor = _owner(model, param_name)
        return isinstance(module, LowBitLayer) and tensor in ("codes", "scale")

    def check_quantized_param_shape(self, param_name, current_param, loaded_param) -> bool:
        if tuple(current_param.shape) != tuple(loaded_param.shape):
            raise BfError(f"{param_name}: the file holds {tuple(loaded_param.shape)}, the layer's spec needs {tuple(current_param.shape)}")
        return True

    def create_quantized_param(self, model, param_value, param_name: str, target_device, state_dict, unexpected_keys, **kwargs):
        module, tensor = _owner(model, param_name)
        stored = state_dict[param_name]  # as in the file: diffusers has cast param_value to the model's dtype
        if stored.dtype != module._buffers[tensor].dtype:
            raise BfError(f"{param_name}: stored as {stored.dtype}, a bitsfusion layer keeps {module._buffers[tensor].dtype}")
        module._buffers[tensor] = stored.to(target_device)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False


def _owner(model: torch.nn.Module, param_name: str):
    """(the module holding a parameter or buffer, or None, and the tensor's attribute name)."""
    try:
        return parent_and_attribute(model, param_name)
    except AttributeError:
        return None, param_name.rpartition(".")[2]


def register() -> None:
    """Add the bitsfusion config and quantizer to diffusers' mappings (diffusers looks them up there at every load),
    and make a model's fuse_lora refuse low-bit layers before it changes anything."""
    from diffusers.loaders import peft as diffusers_peft
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD.value] = BitsFusionQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD.value] = BitsFusionConfig
    from diffusers.models.attention_processor import Attention

    mixin = diffusers_peft.PeftAdapterMixin
    if not getattr(mixin.fuse_lora, "_bitsfusion", False):
        mixin.fuse_lora = _refusing_low_bit(mixin.fuse_lora)
    if not getattr(Attention.fuse_projections, "_bitsfusion", False):
        Attention.fuse_projections = _refusing_fused_projections(Attention.fuse_projections)
    if not getattr(mixin.load_lora_adapter, "_bitsfusion", False):
        mixin.load_lora_adapter = _checking_adapters(mixin.load_lora_adapter)
    from diffusers.models.modeling_utils import ModelMixin

    if not getattr(ModelMixin.save_pretrained, "_bitsfusion", False):
        ModelMixin.save_pretrained = _refusing_low_bit_with_lora(ModelMixin.save_pretrained)
    from diffusers import DiffusionPipeline

    if not getattr(DiffusionPipeline.save_pretrained, "_bitsfusion", False):  # before it writes its other components
        DiffusionPipeline.save_pretrained = _refusing_low_bit_with_lora(DiffusionPipeline.save_pretrained)


def _refusing_low_bit(fuse_lora):
    """``fuse_lora`` that refuses a model whose LoRA sits beside a low-bit layer: fusing writes the low-rank product into
    the layer's weight, and a bitsfusion layer's weight is packed codes on a grid the product does not fit."""

    def refusing(self, *args, **kwargs):
        if (low := _low_bit_under_lora(self)) is not None:
            raise BfError(f"fuse_lora: {low} is a 1.99-bit layer (packed codes) that a LoRA cannot be fused into; keep the LoRA "
                          "as a branch (it already runs beside the layer), or fuse it into the FP model and quantize that")  # fmt: skip
        return fuse_lora(self, *args, **kwargs)

    refusing._bitsfusion = True
    return refusing


def _low_bit_under_lora(model) -> str | None:
    """The first low-bit layer that a LoRA wraps (peft keeps it as its base_layer), or None."""
    return next((n for n, m in model.named_modules() if hasattr(m, "get_base_layer") and isinstance(m.get_base_layer(), LowBitLayer)),
                None)  # fmt: skip


def _refusing_low_bit_with_lora(save_pretrained):
    """``save_pretrained`` that refuses a bitsfusion model with a LoRA loaded, before it writes anything: the file would
    hold the low-bit layers under peft's names (``base_layer.codes``), which no loader reads back."""

    def refusing(self, *args, **kwargs):
        models = [self] if isinstance(self, torch.nn.Module) else [c for c in self.components.values() if isinstance(c, torch.nn.Module)]
        if (low := next((n for m in models if (n := _low_bit_under_lora(m)) is not None), None)) is not None:
            raise BfError(f"save_pretrained: a LoRA is loaded beside the 1.99-bit layer {low}; save the LoRA on its own "
                          "(save_lora_weights), unload it (unload_lora_weights), then save the model")  # fmt: skip
        return save_pretrained(self, *args, **kwargs)

    refusing._bitsfusion = True
    return refusing


def _checking_adapters(load_lora_adapter):
    """``load_lora_adapter`` (what ``pipe.load_lora_weights`` calls) that, on a model with low-bit layers, checks the
    adapters against the layers first: a LoRA for another architecture, a rank or a shape that does not fit get one
    line, before anything is injected (peft would load the first silently and fail the others in many lines)."""

    def checking(self, pretrained_model_name_or_path_or_dict, prefix="transformer", *args, **kwargs):
        if any(isinstance(m, LowBitLayer) for m in self.modules()):
            from bf.lora_adapters import check_adapter_keys

            state, what = pretrained_model_name_or_path_or_dict, "load_lora_weights"
            if not isinstance(state, dict):
                path = Path(state) / kwargs["weight_name"] if kwargs.get("weight_name") else Path(state)
                if path.is_file() and path.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    state, what = load_file(str(path)), f"load_lora_weights {path}"
            if isinstance(state, dict):
                head = f"{prefix}." if prefix else ""
                mine = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
                if mine:  # none: a LoRA for the other components, which diffusers loads there (and says so)
                    check_adapter_keys(self, mine, what)
        return load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix, *args, **kwargs)

    checking._bitsfusion = True
    return checking


def _refusing_fused_projections(fuse_projections):
    """Attention.fuse_projections (what fuse_qkv_projections calls) that refuses low-bit projections: it would
    concatenate their weights, and a low-bit layer's weight is a shape-only stand-in, not the weight."""

    def refusing(self, *args, **kwargs):
        if any(isinstance(getattr(self, n, None), LowBitLayer) for n in ("to_q", "to_k", "to_v", "add_q_proj")):
            raise BfError("fuse_qkv_projections: the attention projections are 1.99-bit layers (packed codes), which are not "
                          "concatenated; run without fusing them")  # fmt: skip
        return fuse_projections(self, *args, **kwargs)

    refusing._bitsfusion = True
    return refusing
