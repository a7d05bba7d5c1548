"""Finding the base model (text encoder, VAE, tokenizer, scheduler) of a checkpoint.

A .bfq holds the UNet; the rest comes from its bundle, or from the directory it was
quantized from, which must still hash the same.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.numpy import save_file

from bf.errors import BfError
from bf.format import Bundle, Checkpoint, read_header
from bf.models.directory import BASE_COMPONENTS, ModelDir, unet_config_family

_WEIGHT_FILE = {"text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def extract_bundle(bundle: Bundle, out: Path) -> Path:
    """Write a bundle as a diffusers directory without unet/."""
    for rel, content in bundle.files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(content)
    for comp, tensors in bundle.tensors.items():
        (out / comp).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / comp / _WEIGHT_FILE[comp]))
    return out


def resolve_base_model(ckpt: Checkpoint, source: Path, override: Path | None = None, log=lambda m: None) -> Path:
    """Directory holding the checkpoint's text encoder, VAE, tokenizer and scheduler."""
    if override is not None:
        model = ModelDir.open(override, BASE_COMPONENTS)
        check_same_family(ckpt.unet_config, model, source)
        if model.content_hash() != ckpt.base_model.get("hash"):
            log(f"warning: {override} differs from the base model {source} was quantized from")
        return model.root
    if ckpt.bundle is not None:
        return extract_bundle(ckpt.bundle, Path(tempfile.mkdtemp(prefix="bf-bundle-")))
    path = _recorded_or_shipped(ckpt.base_model)
    if not path.is_dir():
        raise BfError(f"{source}: its base model {path} is not there; pass --base-model DIR, or quantize with --bundle")
    model = ModelDir.open(path, BASE_COMPONENTS)
    if model.content_hash() != ckpt.base_model.get("hash"):
        raise BfError(f"{source}: base model {path} changed since quantization (hash differs); pass --base-model DIR to use it anyway")
    return path


def _recorded_or_shipped(base_model: dict) -> Path:
    """The directory a .bfq records it was quantized from; where that is gone (a .bfq made on another
    machine, the shipped one included) and its hash is the shipped model's, the shipped model."""
    recorded = base_model.get("path")
    path = Path(recorded) if recorded else None
    if path is not None and path.is_dir():
        return path
    from bf.models.shipped import shipped_model_dir

    try:
        shipped = shipped_model_dir()
    except BfError:  # an install without the shipped model: the caller reports the recorded path
        return path or Path("<no base model recorded>")
    return shipped if ModelDir.open(shipped).content_hash() == base_model.get("hash") else path or Path("<no base model recorded>")


def quantized_from(bfq: Path) -> ModelDir:
    """The full FP model directory (UNet included) a .bfq was quantized from: the baseline it is compared with."""
    path = _recorded_or_shipped(read_header(bfq)["base_model"])
    try:
        return ModelDir.open(path)
    except BfError as e:
        raise BfError(f"the FP model {bfq} was quantized from: {e}") from None


def source_family(source: Path) -> str:
    """ "sdxl" or "sd15": of a .bfq (its UNet config) or a model directory; "sd15" where it cannot be read (the
    caller reports that)."""
    source = Path(source)
    try:
        if source.is_file():
            return unet_config_family(read_header(source).get("unet_config", {}))
        return ModelDir(source).family
    except BfError:
        return "sd15"


def check_same_family(unet_config: dict, base: ModelDir, source: Path) -> None:
    """One line when a UNet (its config) and a base model (text encoders, VAE) are of different families."""
    unet_family = unet_config_family(unet_config)
    if unet_family != base.family:
        names = {"sdxl": "an SDXL", "sd15": "an SD-v1.5-style"}
        raise BfError(f"{source}: its UNet is {names[unet_family]} one and {base.root} is {names[base.family]} model (text encoders, "
                      f"VAE); pass the {'SDXL' if unet_family == 'sdxl' else 'SD-v1.5-style'} model it was quantized from")  # fmt: skip
