"""The exported directory's manifest.json (docs/EXPORT.md): written by bf export, read by every runtime.

One typed record, validated on load: a directory that does not follow docs/EXPORT.md is refused in
one line before anything runs. The JSON keeps the optional fields it had (``raw``), so a manifest
read and written again loses nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bf.errors import BfError

EXPORT_FORMAT, EXPORT_VERSION = "bf.export", 1
GRAPHS = ("text_encoder", "unet", "vae_decoder")
FAMILY_GRAPHS = {"sd15": GRAPHS, "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder")}
TARGETS = ("onnx", "onnx-std", "onnx-qdq", "trt", "trt-rtx")
ENGINE_TARGETS = ("trt", "trt-rtx")  # the targets that build TensorRT engines
GRAPH_FORMS = ("custom", "std", "qdq")


@dataclass(frozen=True)
class ModelIdentity:
    source: str
    quantized: bool
    sha256: str | None = None
    base_model_hash: str | None = None


@dataclass(frozen=True)
class SchedulerInfo:
    name: str
    steps: int
    timesteps: list[int]


@dataclass(frozen=True)
class ImageInfo:
    height: int
    width: int
    max_batch: int
    latent_scale: int
    native: int | None = None  # the model's training size; absent in older exports
    size_multiple: int | None = None  # what height and width must be multiples of (latent scale x the UNet's downsampling)


@dataclass(frozen=True)
class ExportManifest:
    target: str
    graph_form: str
    precision: str
    model: ModelIdentity
    scheduler: SchedulerInfo
    image: ImageInfo
    latent_channels: int
    hidden_size: int
    max_tokens: int
    graphs: dict[str, dict]
    engines: dict | None = None
    family: str = "sd15"  # sdxl: a second text encoder, the pooled prompt and micro-conditioning into the UNet
    pooled_size: int = 0
    force_zeros_for_empty_prompt: bool = False  # an empty negative prompt is fed as zeros (SDXL base)
    vae_upcast: bool = False  # the VAE overflows in float16: run in float32 (or bfloat16)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # every field, as written

    @classmethod
    def from_json(cls, obj: dict, where: str = "manifest.json") -> ExportManifest:
        def need(d: dict, key: str, kind, ctx: str = ""):
            v = d.get(key) if isinstance(d, dict) else None
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise BfError(f"{where}: {ctx}{key} is missing or not {_kind_name(kind)}; export again with 'bf export'")
            return v

        if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT or obj.get("format_version") != EXPORT_VERSION:
            got = f"{obj.get('format')} v{obj.get('format_version')}" if isinstance(obj, dict) else type(obj).__name__
            raise BfError(f"{where}: format {got}, this bf reads {EXPORT_FORMAT} v{EXPORT_VERSION}; export again with this bf")
        target, form = need(obj, "target", str), obj.get("graph_form") or ("std" if obj.get("target") == "onnx-std" else "custom")
        if target not in TARGETS or form not in GRAPH_FORMS:
            raise BfError(f"{where}: target {target!r} with graph form {form!r} is not one bf knows; export again with this bf")
        m, s, i = need(obj, "model", dict), need(obj, "scheduler", dict), need(obj, "image", dict)
        graphs = need(obj, "graphs", dict)
        family = obj.get("family", "sd15")
        if family not in FAMILY_GRAPHS:
            raise BfError(f"{where}: family {family!r} is not one bf knows ({', '.join(FAMILY_GRAPHS)}); export again with this bf")
        for name in FAMILY_GRAPHS[family]:
            g = need(graphs, name, dict, "graphs.")
            need(g, "files", dict, f"graphs.{name}.")
        timesteps = need(s, "timesteps", list, "scheduler.")
        if len(timesteps) == 0 or not all(isinstance(t, int) for t in timesteps):
            raise BfError(f"{where}: scheduler.timesteps must be a non-empty list of integers; export again with 'bf export'")
        return cls(
            target=target,
            graph_form=form,
            precision=need(obj, "precision", str),
            model=ModelIdentity(need(m, "source", str, "model."), bool(m.get("quantized")), m.get("sha256"), m.get("base_model_hash")),
            scheduler=SchedulerInfo(need(s, "name", str, "scheduler."), need(s, "steps", int, "scheduler."), timesteps),
            image=ImageInfo(
                need(i, "height", int, "image."),
                need(i, "width", int, "image."),
                need(i, "max_batch", int, "image."),
                need(i, "latent_scale", int, "image."),
                i.get("native"),
                i.get("size_multiple"),
            ),
            latent_channels=need(obj, "latent_channels", int),
            hidden_size=need(obj, "hidden_size", int),
            max_tokens=need(obj, "max_tokens", int),
            graphs=graphs,
            engines=obj.get("engines"),
            family=family,
            pooled_size=_pooled_size(obj, family, where),
            force_zeros_for_empty_prompt=bool(obj.get("force_zeros_for_empty_prompt", False)),
            vae_upcast=bool(obj.get("vae_upcast", False)),
            raw=obj,
        )

    def to_json(self) -> dict:
        return self.raw

    @property
    def graph_names(self) -> tuple[str, ...]:
        return FAMILY_GRAPHS[self.family]


def read_manifest(root: Path) -> ExportManifest:
    """``root/manifest.json``, validated; BfError in one line otherwise."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise BfError(f"{root}: no manifest.json; is this a 'bf export' output directory?")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BfError(f"{path} is not valid JSON ({e}); export again with 'bf export'") from None
    return ExportManifest.from_json(obj, str(path))


def manifest_json(manifest: dict) -> str:
    """The text of a manifest the exporter built; checked by reading it back, so bf never writes one it would refuse."""
    ExportManifest.from_json(manifest)
    return json.dumps(manifest, indent=1)


def _pooled_size(obj: dict, family: str, where: str) -> int:
    """An SDXL export's text_embeds width: a positive integer (0 for other families)."""
    value = obj.get("pooled_size", 0)
    if family == "sdxl" and (type(value) is not int or value <= 0):
        raise BfError(f"{where}: pooled_size must be a positive integer for an SDXL export, got {value!r}; export again with 'bf export'")
    return value if type(value) is int else 0


def _kind_name(kind) -> str:
    return {str: "a string", int: "an integer", dict: "an object", list: "a list"}[kind]
