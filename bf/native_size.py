"""How far an image size is from the one a model was trained at (export and runtime both warn), and the nearest
size the exported UNet takes (both refuse others with it)."""

from __future__ import annotations

from bf.errors import BfError

FAR = 2  # beyond this factor either way, a diffusion model's images degrade (repeated or cut-off objects)


def far_from_native(height: int, width: int, native: int) -> str | None:
    """A warning line for a size beyond FAR x the native one either way, else None."""
    if max(height, width) > FAR * native or min(height, width) * FAR < native:
        return f"warning: {height}x{width} is far from the {native}x{native} this model was trained at; its images there are likely poor"
    return None


def size_rule(unet_config: dict, vae_config: dict) -> tuple[int, int, int]:
    """(multiple, levels, native) of a diffusers UNet and VAE: image sizes must be multiples of the VAE's latent scale
    times the UNet's ``levels`` (how often it halves its latents; an exported graph traces each resampling size);
    ``native`` is the size it was trained at."""
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    levels = 2 ** (len(unet_config["block_out_channels"]) - 1)
    return vae_scale * levels, levels, int(unet_config["sample_size"]) * vae_scale


def nearest_multiple(value: int, multiple: int) -> int:
    """The positive multiple of ``multiple`` nearest ``value`` (halves round up)."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


def check_size(height: int, width: int, multiple: int) -> None:
    """One line, with the nearest sizes, unless both are positive multiples of ``multiple``."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        near = ", ".join(f"{n} {nearest_multiple(v, multiple)}" for n, v in (("--height", height), ("--width", width)))
        raise BfError(f"--height {height} --width {width}: both must be positive multiples of {multiple} (nearest: {near})")
