"""Training data for QAT: image-caption pairs, encoded once by the VAE into latents.

``--data shapes`` renders the procedural set (the shipped model's); ``--data DIR`` reads
image files with same-name ``.txt`` captions, or a ``.jsonl`` of {"image", "caption"}
(paths relative to the file). Images are resized (shorter side) and center-cropped to
the model's resolution. Unreadable images are skipped and counted, not fatal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bf.errors import BfError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LatentSet:
    latents: torch.Tensor  # (N, 4, h, w), already multiplied by the VAE scaling factor
    captions: list[str]
    skipped: int = 0


def _pairs_from_dir(root: Path) -> list[tuple[Path, str]]:
    jsonl = sorted(root.glob("*.jsonl"))
    pairs = []
    if jsonl:
        for f in jsonl:
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    pairs.append((f.parent / rec["image"], str(rec["caption"])))
                except (ValueError, KeyError, TypeError):
                    raise BfError(f'{f}:{n}: expected {{"image": ..., "caption": ...}}') from None
        return pairs
    for img in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = img.with_suffix(".txt")
        if txt.is_file():
            pairs.append((img, txt.read_text(encoding="utf-8").strip()))
    return pairs


def load_image(path: Path, size: int) -> np.ndarray | None:
    """uint8 (size, size, 3): shorter side resized to ``size``, center crop; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            k = size / min(w, h)
            im = im.resize((max(size, round(w * k)), max(size, round(h * k))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def check_data(spec: str, limit: int | None = None) -> list[tuple[Path, str]]:
    """The image-caption pairs of ``--data`` (none for ``shapes``), before any model loads."""
    return [] if spec == "shapes" else _pairs(Path(spec), limit)


def _pairs(root: Path, limit: int | None) -> list[tuple[Path, str]]:
    if not root.is_dir():
        raise BfError(f"--data {root}: not a directory (image files with same-name .txt captions, or a .jsonl), nor 'shapes'")
    pairs = _pairs_from_dir(root)[:limit]
    if not pairs:
        raise BfError(f"--data {root}: no image-caption pairs (image files with same-name .txt captions, or a .jsonl)")
    return pairs


def read_image_captions(root: Path, size: int, limit: int | None = None) -> tuple[np.ndarray, list[str], int]:
    pairs = _pairs(root, limit)
    images, captions, skipped = [], [], 0
    for path, cap in pairs:
        img = load_image(path, size)
        if img is None:
            skipped += 1
            continue
        images.append(img)
        captions.append(cap)
    if not images:
        raise BfError(f"--data {root}: none of the {len(pairs)} images could be read")
    return np.stack(images), captions, skipped


def render_shapes(n: int, seed: int, size: int, progress: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, list[str]]:
    """Training scenes (never a held-out pair) rendered at the model's resolution."""
    from bf.shapes.render import render
    from bf.shapes.scenes import caption, sample_scene

    images, captions = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])  # the order training_example draws in
        scene = sample_scene(rng)
        images.append(render(scene, rng, resolution=size))
        captions.append(caption(scene, rng))
        progress(1)
    return np.stack(images), captions


@torch.no_grad()
def encode_images(vae, images_u8: np.ndarray, batch: int = 64, progress: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(images_u8), batch):
        x = torch.from_numpy(images_u8[i : i + batch]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
        progress(len(x))
    return torch.cat(out)


def load_latents(spec: str, vae, size: int, n: int, seed: int = 0, log: Callable[[str], None] = lambda m: None) -> LatentSet:
    """The training set as latents: ``shapes`` (``n`` rendered images) or a directory.

    Rendering and encoding show progress (a bar on a terminal, lines in a log): 20000 images
    take minutes on a CPU."""
    from bf.progress import progress_bar

    if spec == "shapes":
        with progress_bar(total=n, desc="render", unit="img", disable=None, file=sys.stderr) as bar:
            images, captions = render_shapes(n, seed, size, bar.update)
        skipped = 0
    else:
        images, captions, skipped = read_image_captions(Path(spec), size, n)
        if skipped:
            log(f"skipped {skipped} unreadable image(s) in {spec}")
    with progress_bar(total=len(images), desc="encode", unit="img", disable=None, file=sys.stderr) as bar:
        latents = encode_images(vae, images, progress=bar.update)
    return LatentSet(latents, captions, skipped)
