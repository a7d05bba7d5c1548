"""CLIP score (cosine similarity of image and prompt embeddings) with a local CLIP model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bf.errors import BfError


def check_clip_dir(model_dir: Path) -> None:
    """Cheap up-front check (before minutes of other work) that ``model_dir`` can be a CLIP model."""
    if not (Path(model_dir) / "config.json").is_file():
        raise BfError(f"{model_dir}: not a local CLIP model directory (no config.json)")


class ClipScorer:
    def __init__(self, model_dir: Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        check_clip_dir(model_dir)
        self.model = CLIPModel.from_pretrained(model_dir, use_safetensors=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_dir)
        self.device = device

    def __call__(self, images: np.ndarray, prompts: list[str]) -> float:
        import torch

        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return float((img * txt).sum(-1).mean())
