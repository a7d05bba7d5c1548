"""An exported model directory (``bf export``'s output), checked before anything runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from bf.errors import BfError
from bf.format.export_manifest import ENGINE_TARGETS, ExportManifest, read_manifest
from bf.native_size import check_size, far_from_native


def export_command(bfq: str, manifest: ExportManifest, scheduler: str, steps: int) -> str:
    """The bf export command that makes this export again for ``scheduler`` and ``steps``: the settings it was made
    with (target, size, engine options, LoRAs), as its manifest records them."""
    s = manifest.raw.get("export_settings") or {}
    args = ["bf export", str(bfq), "--target", manifest.target]
    engines = manifest.target in ENGINE_TARGETS
    for flag, key in (("--height", "height"), ("--width", "width")):
        if s.get(key):
            args += [flag, str(s[key])]
    if engines:
        weights = s.get("weights") or ("plugin" if manifest.graph_form == "custom" else None)
        args += ["--weights", weights] if weights else []
        args += ["--batch", str(s["batch"])] if s.get("batch", 2) != 2 else []
        args += ["--fp32"] if s.get("precision") == "fp32" else []
        args += ["--gpu-arch", ",".join(s["gpu_archs"])] if s.get("gpu_archs") else []
        args += ["--plugin", str(s["plugin"])] if s.get("plugin") else []
    for file, scale in s.get("loras") or ():
        args += ["--lora", f"{file}:{scale:g}"]
    return " ".join([*args, "--scheduler", scheduler, "--steps", str(steps), "--out DIR"])


@dataclass
class ExportedModel:
    root: Path
    manifest: ExportManifest

    @classmethod
    def open(cls, root: Path) -> ExportedModel:
        root = Path(root)
        manifest = read_manifest(root)
        for name in manifest.graph_names:
            for f in manifest.graphs[name]["files"]:
                if not (root / f).is_file():
                    raise BfError(f"{root}: {f} is missing; export again with 'bf export'")
        for f in ("tokenizer", *(["tokenizer_2"] if manifest.family == "sdxl" else []), "scheduler/scheduler_config.json"):
            if not (root / f).exists():
                raise BfError(f"{root}: {f} is missing; export again with 'bf export'")
        return cls(root, manifest)

    @cached_property
    def tokenizer(self):
        """The CLIP tokenizer of the export, loaded once (reading its vocabulary takes ~0.1 s)."""
        from bf.runtime.tokenizer import ClipTokenizer

        return ClipTokenizer(self.root / "tokenizer")

    @cached_property
    def tokenizer_2(self):
        """SDXL's second tokenizer (its own pad token)."""
        from bf.runtime.tokenizer import ClipTokenizer

        return ClipTokenizer(self.root / "tokenizer_2")

    @property
    def scheduler_config(self) -> dict:
        return json.loads((self.root / "scheduler" / "scheduler_config.json").read_text())

    def check_sampler(self, name: str, steps: int) -> None:
        """The UNet reads a time-feature table built for one scheduler and step count."""
        m = self.manifest.scheduler
        if (name, steps) != (m.name, m.steps):
            bfq = self.manifest.model.source or "M.bfq"
            raise BfError(
                f"{self.root} was exported for {m.name} with {m.steps} steps, not {name} with {steps}; "
                f"export again: {export_command(bfq, self.manifest, name, steps)}"
            )

    def image_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The image size to run at (default: the export's), checked against the latent scale."""
        image = self.manifest.image
        height, width = height or image.height, width or image.width
        check_size(height, width, image.size_multiple or image.latent_scale)
        return height, width

    def size_warning(self, height: int | None, width: int | None) -> str | None:
        """A line for a size far (beyond 2x either way) from the model's native one (exports that do not
        record it: the export's size); a size the model cannot take is refused first (``image_size``)."""
        self.image_size(height, width)
        image = self.manifest.image
        native = image.native or max(image.height, image.width)
        return far_from_native(height or image.height, width or image.width, native)
