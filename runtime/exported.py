"""An exported model directory (``bf export``'s output), checked before anything runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from bf.errors import BfError
from bf.format.export_manifest import ExportManifest, read_manifest
from bf.native_size import check_size, far_from_native


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
            # engines built from the custom-op graphs: the same weights form again
            plugin = " --weights plugin" if self.manifest.target.startswith("trt") and self.manifest.graph_form == "custom" else ""
            raise BfError(
                f"{self.root} was exported for {m.name} with {m.steps} steps, not {name} with {steps}; "
                f"export again: bf export {bfq} --target {self.manifest.target}{plugin} --scheduler {name} --steps {steps} --out DIR"
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
