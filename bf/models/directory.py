"""A local diffusers-format Stable Diffusion directory: validation, configs, weights, hash.

Weights are read only from safetensors files (never unpickled). Nothing here imports
torch unless torch tensors are asked for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from bf.errors import BfError
from bf.format import Bundle

COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
BASE_COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler")  # what a .bfq refers back to
SDXL_COMPONENTS = {"text_encoder": "text_encoder_2", "tokenizer": "tokenizer_2"}  # SDXL's second of each
_CONFIG = {"unet": "config.json", "text_encoder": "config.json", "text_encoder_2": "config.json", "vae": "config.json",
           "scheduler": "scheduler_config.json"}  # fmt: skip
_WEIGHT_STEM = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model", "vae": "diffusion_pytorch_model"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ModelDir:
    root: Path

    @classmethod
    def open(cls, path: str | Path, components: tuple[str, ...] = COMPONENTS) -> ModelDir:
        """Validate the directory; one error lists everything that is missing."""
        root = Path(path)
        if not root.is_dir():
            raise BfError(
                f"{root}: no such model directory; pass a local diffusers Stable Diffusion directory or make one with 'bf random-model'"
            )
        problems = [] if (root / "model_index.json").is_file() else ["model_index.json"]
        _refuse_refiner(root)
        family = model_family(root)
        if family == "sdxl":
            components = _with_sdxl_components(components)
        for comp in components:
            problems += _component_problems(root, comp)
        if problems:
            what = "Stable Diffusion XL" if family == "sdxl" else "Stable Diffusion"
            raise BfError(f"{root} is not a complete diffusers {what} directory: missing {', '.join(problems)}; "
                          "copy the whole model (every component, safetensors weights) or pass another directory")  # fmt: skip
        return cls(root)

    @property
    def family(self) -> str:
        """ "sdxl" (two text encoders, the UNet's text_time added embedding) or "sd15" (SD-v1.x/2.x layout)."""
        return model_family(self.root)

    def base_components(self) -> tuple[str, ...]:
        """What a .bfq of this model refers back to: everything but the UNet."""
        return _with_sdxl_components(BASE_COMPONENTS) if self.family == "sdxl" else BASE_COMPONENTS

    def model_index(self) -> dict:
        obj = _read_json(self.root / "model_index.json", "model index")
        if not isinstance(obj, dict):
            raise BfError(f"{self.root / 'model_index.json'}: unreadable model index (not a JSON object)")
        return obj

    def config(self, component: str) -> dict:
        path = self.root / component / _CONFIG[component]
        cfg = _read_json(path, "config")
        if not isinstance(cfg, dict):
            raise BfError(f"{path}: unreadable config (not a JSON object)")
        return cfg

    def weight_files(self, component: str) -> list[Path]:
        files = _weight_files(self.root / component, _WEIGHT_STEM[component])
        if files is None:
            raise BfError(f"{self.root / component}: no safetensors weights")
        return files

    def variant(self, component: str) -> dict:
        """``from_pretrained``'s keyword for ``component``'s weights: {"variant": "fp16"} where the directory holds only
        the ``.fp16`` files (as many SDXL downloads do), else nothing."""
        files = _weight_files(self.root / component, _WEIGHT_STEM[component]) or []
        return {"variant": "fp16"} if files and ".fp16." in files[0].name else {}

    def read_weights(self, component: str, framework: str = "numpy") -> dict:
        """Parameter name -> tensor ("numpy" arrays or "pt" torch tensors)."""
        from safetensors import safe_open

        out = {}
        for f in self.weight_files(component):
            try:
                with safe_open(str(f), framework=framework) as st:
                    for k in st.keys():  # noqa: SIM118 (safe_open is no dict)
                        out[k] = st.get_tensor(k)
            except Exception as e:  # safetensors' own error type for a damaged file
                raise BfError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]}); re-download or re-convert it") from None
        return out

    def component_files(self, component: str) -> list[Path]:
        return sorted(p for p in (self.root / component).rglob("*") if p.is_file())

    def content_hash(self, components: tuple[str, ...] | None = None) -> str:
        """SHA-256 over model_index.json and every file of the components (path and bytes); by default the
        base components (``base_components``).

        Which files, their order and the bytes hashed are specified in docs/FORMAT.md section 2
        ("base_model"), so an independent reader can recompute the hash.
        """
        if components is None:
            components = self.base_components()
        elif self.family == "sdxl":
            components = _with_sdxl_components(components)
        h = hashlib.sha256()
        files = [self.root / "model_index.json"] + [f for c in components for f in self.component_files(c)]
        for rel, f in sorted((f.relative_to(self.root).as_posix(), f) for f in files):
            try:
                name = rel.encode()
            except UnicodeEncodeError:  # a name whose bytes are not UTF-8 has no path string to hash
                raise BfError(f"{self.root}: file name {rel!r} is not UTF-8; rename the file to hash the model directory") from None
            h.update(name + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()


def unet_config_family(config: dict) -> str:
    """ "sdxl" for a UNet config with SDXL's text_time added embedding, else "sd15"."""
    return "sdxl" if dict(config).get("addition_embed_type") == "text_time" else "sd15"


def model_family(root: Path) -> str:
    """ "sdxl" when model_index.json names a second text encoder or the UNet config has SDXL's text_time added
    embedding (either suffices: a directory missing one of them still gets SDXL's error), else "sd15"."""
    if "text_encoder_2" in _json_object(root / "model_index.json"):
        return "sdxl"
    return unet_config_family(_json_object(root / "unet" / "config.json"))


def _json_object(path: Path) -> dict:
    """The JSON object in ``path``; empty where it is missing, unreadable or no object (the component checks say so)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _refuse_refiner(root: Path) -> None:
    """SDXL's refiner (the second text encoder alone, an aesthetic score in its micro-conditioning) is not a model bf
    takes: one line rather than a missing text_encoder/."""
    index = _json_object(root / "model_index.json")
    one_encoder = "text_encoder_2" in index and index.get("text_encoder") in ([None, None], None)
    if index.get("requires_aesthetics_score") or one_encoder:
        raise BfError(f"{root} is an SDXL refiner (one text encoder, an aesthetic score in its conditioning); bf takes SD-v1.5-style "
                      "and SDXL base-style models: pass the base model's directory")  # fmt: skip


def _with_sdxl_components(components: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(c for comp in components for c in (comp, SDXL_COMPONENTS.get(comp)) if c is not None)


def _weight_files(comp_dir: Path, stem: str) -> list[Path] | None:
    for variant in ("", ".fp16"):
        single = comp_dir / f"{stem}{variant}.safetensors"
        if single.is_file():
            return [single]
        index = comp_dir / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            return [comp_dir / s for s in _shard_names(index)]
    return None


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON and non-UTF-8 bytes (UnicodeDecodeError)
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BfError(f"{path}: unreadable {what} ({detail})") from None


def _shard_names(index: Path) -> list[str]:
    """Shard file names of a safetensors index, each a plain path inside the component directory."""
    obj = _read_json(index, "shard index")
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise BfError(f'{index}: unreadable shard index (needs "weight_map": parameter name -> shard file name)')
    shards = sorted(set(weight_map.values()))
    for s in shards:
        p = PurePosixPath(s)
        # A crafted index must not make us read files outside the model directory.
        if not s or p.is_absolute() or ".." in p.parts or "\\" in s:
            raise BfError(f"{index}: shard {s!r} is not a file name inside {index.parent.name}/")
    return shards


def _component_problems(root: Path, comp: str) -> list[str]:
    d = root / comp
    if not d.is_dir():
        return [f"{comp}/"]
    if comp.startswith("tokenizer"):
        return [f"{comp}/{f}" for f in _TOKENIZER_FILES if not (d / f).is_file()]
    problems = [] if (d / _CONFIG[comp]).is_file() else [f"{comp}/{_CONFIG[comp]}"]
    if comp in _WEIGHT_STEM:
        files = _weight_files(d, _WEIGHT_STEM[comp])
        if files is None:
            pickled = [p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES]
            hint = f" (found {pickled[0]}: pickle weights are never loaded; convert to safetensors)" if pickled else ""
            problems.append(f"{comp}/{_WEIGHT_STEM[comp]}.safetensors{hint}")
        else:
            problems += [str(f.relative_to(root)) for f in files if not f.is_file()]
    return problems


def bundle_from_model_dir(model: ModelDir) -> Bundle:
    """Text encoder(s) and VAE weights in fp16 and every small file a deployment needs."""
    weighted = [c for c in model.base_components() if c in _WEIGHT_STEM]
    tensors = {comp: {k: np.asarray(v).astype(np.float16) for k, v in model.read_weights(comp).items()} for comp in weighted}
    files = {"model_index.json": (model.root / "model_index.json").read_bytes()}
    for comp in model.base_components():
        for f in model.component_files(comp):
            is_config = f.suffix == ".json" and not f.name.endswith(".index.json")
            if comp.startswith("tokenizer") or is_config:
                files[str(f.relative_to(model.root))] = f.read_bytes()
    return Bundle(files=files, tensors=tensors)


def copy_base(src: Path, dst: Path) -> None:
    """``src``'s text encoder(s), tokenizer(s), VAE, scheduler and model_index.json into ``dst``: a model directory but its UNet."""
    for comp in ModelDir(src).base_components():
        shutil.copytree(src / comp, dst / comp)
    shutil.copy2(src / "model_index.json", dst / "model_index.json")


def write_with_unet(model: ModelDir, unet_weights: dict, out: Path, note: dict | None = None) -> None:
    """A copy of ``model`` at ``out`` whose UNet weights are ``unet_weights`` (name -> torch tensor, the UNet's
    state dict; the UNet's config and each weight's dtype are kept), written as safetensors; ``note`` goes to
    ``bf_training.json``.
    The directory appears whole or not at all."""
    from safetensors.torch import save_file

    from bf.atomic import atomic_dir

    base = model.read_weights("unet", "pt")
    expected = set(base)
    if set(unet_weights) != expected:
        missing, extra = sorted(expected - set(unet_weights)), sorted(set(unet_weights) - expected)
        raise BfError(f"UNet weights for {model.root} do not match its UNet: missing {missing[:3]}, unexpected {extra[:3]}")
    with atomic_dir(out) as tmp:
        copy_base(model.root, tmp)
        (tmp / "unet").mkdir()
        shutil.copy2(model.root / "unet" / _CONFIG["unet"], tmp / "unet" / _CONFIG["unet"])
        tensors = {k: v.detach().to("cpu", base[k].dtype).contiguous() for k, v in unet_weights.items()}  # the base's dtypes
        save_file(tensors, str(tmp / "unet" / f"{_WEIGHT_STEM['unet']}.safetensors"))
        if note is not None:
            (tmp / "bf_training.json").write_text(json.dumps(note, indent=1))
