"""Per-layer sensitivity analysis (docs/RECIPE.md section 3): ``bf analyze``.

Every candidate layer alone is quantized (balanced grid, alternating init) to each
analysed width, everything else stays full precision; images generated with fixed
prompts and seeds are compared with the FP model's: pixel MSE, and the semantic drop
(FP minus quantized: prompt-faithfulness accuracy for shapes prompts, else the CLIP
score when a CLIP model is given). With ``qat_steps`` each layer is tuned by a short
QAT of that layer alone before it is judged. The JSON is rewritten (atomically) after
every layer, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bf.atomic import atomic_path
from bf.errors import BfError
from bf.evaluate.evaluation import prompt_sets
from bf.evaluate.generate import generate
from bf.evaluate.metrics import accuracy, fidelity
from bf.format import EDGE_LAYERS, Grid, candidate_layers
from bf.format.summary import TIME_TABLE_STEPS, time_layer_counts
from bf.trainer.allocate import ANALYSED_BITS, ANALYSIS_FORMAT, ANALYSIS_VERSION
from bf.trainer.ptq import PTQConfig, quantize_weight


@dataclass(frozen=True)
class AnalyzeConfig:
    bits: tuple[int, ...] = ANALYSED_BITS
    prompts: str = "shapes-test"
    limit: int | None = 4  # prompts per split
    seeds: int = 1
    seed: int = 1024
    cfg: float = 7.5
    scheduler: str = "pndm"
    steps: int = 50  # PNDM: the shipped model is far worse at 25 steps (accuracy 0.28 against 0.89 on the same 18 prompts)
    init: str = "alt"
    batch_size: int = 32
    layers: str | None = None  # regex: analyse only matching layers
    qat_steps: int = 0  # > 0: short QAT of each layer alone before judging it (trainer/short_qat.py)
    clip: str | None = None  # local CLIP model directory: CLIP score of every image set


def accounting(shapes: dict[str, tuple[int, ...]]) -> dict:
    """What the paper's average needs besides the analysed layers (see allocate.Accounting)."""
    time_weights, per_step = time_layer_counts(shapes)
    return {
        "edge_layers": {m: list(shapes[f"{m}.weight"]) for m in EDGE_LAYERS if f"{m}.weight" in shapes},
        "time_weight_params": time_weights,
        "time_features": TIME_TABLE_STEPS * per_step,
        "time_table_steps": TIME_TABLE_STEPS,
    }


class _Jobs:
    """The fixed prompts and seeds, and how the FP model does on them."""

    def __init__(self, cfg: AnalyzeConfig):
        self.jobs, self.scenes = [], []
        for ps in prompt_sets(cfg.prompts, cfg.limit):
            for p, sc in zip(ps.prompts, ps.scenes, strict=True):
                for k in range(cfg.seeds):
                    self.jobs.append((p, cfg.seed + k))
                    self.scenes.append(sc)

    def run(self, pipe, cfg: AnalyzeConfig, clip=None) -> tuple[np.ndarray, np.ndarray, float | None, float | None]:
        """Images, latents, accuracy (shapes prompts only) and CLIP score (with a scorer)."""
        imgs, lats = generate(pipe, self.jobs, cfg.cfg, cfg.steps, cfg.batch_size)
        score = clip(imgs, [p for p, _ in self.jobs]) if clip is not None else None
        return imgs, lats, accuracy(imgs, self.scenes).get("overall"), score


def semantic_drop(fp_acc, acc, fp_clip, clip_score) -> float:
    """Accuracy lost where the prompts can be judged, else CLIP score lost, else 0."""
    if acc is not None:
        return fp_acc - acc
    if clip_score is not None:
        return fp_clip - clip_score
    return 0.0


def settings_changed(a: dict, b: dict) -> list[str]:
    """Settings two analyses differ in; ``layers`` does not count (analysing in chunks is fine).

    A setting missing from one (an analysis from before it existed) counts as its default, except the prompts'
    hash: an analysis that does not record it may have judged by other prompts."""
    default = settings_of(AnalyzeConfig())
    del default["prompts_sha256"]
    return sorted(k for k in (a.keys() | b.keys()) - {"layers"} if a.get(k, default.get(k)) != b.get(k, default.get(k)))


def settings_of(cfg: AnalyzeConfig) -> dict:
    """The settings an analysis records, and a resume must match: the config, and the SHA-256 of the prompts it
    judges by (split names and texts), which a config names only by 'shapes-test' or a file path."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    text = "\n".join(line for ps in prompt_sets(cfg.prompts, cfg.limit) for line in (f"[{ps.split}]", *ps.prompts))
    return settings | {"prompts_sha256": hashlib.sha256(text.encode()).hexdigest()}


def check_resumable(out: Path, cfg: AnalyzeConfig, model: dict, resume: bool) -> None:
    """Raise now what ``analyze`` would raise about ``out`` (before workers are started)."""
    _load_existing(out, settings_of(cfg), model, resume)


def _load_existing(out: Path, settings: dict, model: dict, resume: bool) -> dict | None:
    if not out.exists():
        return None
    if not resume:
        raise BfError(f"{out} exists; pass --resume to continue it, or choose another --out")
    try:
        prev = json.loads(out.read_text())
    except (OSError, ValueError) as e:
        raise BfError(f"{out}: cannot resume, not a readable analysis ({e})") from None
    if prev.get("format") != ANALYSIS_FORMAT:
        raise BfError(f"{out}: cannot resume, not a bf analysis")
    if prev.get("model", {}).get("hash") != model["hash"]:
        raise BfError(f"{out}: cannot resume, it was made for another model ({prev.get('model', {}).get('path')})")
    changed = settings_changed(prev.get("settings", {}), settings)
    if changed:
        raise BfError(f"{out}: cannot resume with different settings ({', '.join(changed)}); use the original ones or a new --out")
    return prev


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N): this process analyses every N-th candidate layer starting at the K-th."""
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise BfError(f"--shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4")
    return int(m[1]), int(m[2])


def merge_analyses(parts: list[tuple[str, dict]]) -> dict:
    """One analysis from several of the same model and settings (shards, or chunks by --layers)."""
    (first_src, first), *rest = parts
    if first.get("format") != ANALYSIS_FORMAT:
        raise BfError(f"{first_src}: not a bf analysis")
    merged = json.loads(json.dumps(first))
    for src, part in rest:
        if part.get("format") != ANALYSIS_FORMAT:
            raise BfError(f"{src}: not a bf analysis")
        if part.get("model", {}).get("hash") != first.get("model", {}).get("hash"):
            raise BfError(f"{src}: made for another model than {first_src}; analyses of different models cannot be merged")
        changed = settings_changed(first.get("settings", {}), part.get("settings", {}))
        if changed:
            raise BfError(f"{src}: made with other settings than {first_src} ({', '.join(changed)}); they cannot be merged")
        merged["layers"].update(part["layers"])
    merged["settings"]["layers"] = None
    order = {n: i for i, n in enumerate(merged["candidates"])}
    merged["layers"] = dict(sorted(merged["layers"].items(), key=lambda kv: order.get(kv[0], len(order))))
    merged["complete"] = all(n in merged["layers"] for n in merged["candidates"])
    return merged


def layer_pattern(regex: str | None) -> re.Pattern | None:
    """--layers compiled, or a one-line error."""
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise BfError(f"--layers {regex!r}: not a regular expression ({e})") from None


def analyze(
    pipe,
    model: dict,
    cfg: AnalyzeConfig,
    out: Path,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    progress: Callable[[int, int, str], None] = lambda done, total, name: None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Run (or continue) the analysis; returns the analysis dict also written to ``out``."""
    unet = pipe.unet
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    candidates = list(candidate_layers(shapes))
    names = candidates
    if cfg.layers:
        pattern = layer_pattern(cfg.layers)
        names = [n for n in names if pattern.search(n)]
        if not names:
            raise BfError(f"--layers {cfg.layers!r} matches no candidate layer (e.g. {candidates[0]})")
    if shard is not None:
        names = names[shard[0] :: shard[1]]
    settings = settings_of(cfg)
    result = _load_existing(out, settings, model, resume) or {
        "format": ANALYSIS_FORMAT,
        "version": ANALYSIS_VERSION,
        "model": model,
        "settings": settings,
        "accounting": accounting(shapes),
        "candidates": candidates,
        "layers": {},
    }
    result["settings"] = settings
    jobs = _Jobs(cfg)
    clip = None
    if cfg.clip is not None:
        from bf.evaluate.clip_score import ClipScorer

        clip = ClipScorer(Path(cfg.clip), str(next(unet.parameters()).device))
    t0 = time.time()
    fp_imgs, fp_lats, fp_acc, fp_clip = jobs.run(pipe, cfg, clip)
    result["fp"] = {"accuracy": fp_acc, "clip_score": fp_clip, "images": len(fp_imgs)}
    log(
        f"FP model: {len(fp_imgs)} images in {time.time() - t0:.1f}s"
        + (f", accuracy {fp_acc:.3f}" if fp_acc is not None else "")
        + (f", CLIP score {fp_clip:.4f}" if fp_clip is not None else "")
    )

    todo = [n for n in names if n not in result["layers"]]
    log(f"{len(names) - len(todo)} of {len(names)} layers already analysed; {len(todo)} to go, {len(cfg.bits)} widths each")
    if todo:  # each width of each layer generates the FP model's images again
        from bf.progress import duration

        estimate = len(todo) * len(cfg.bits) * (time.time() - t0)
        log(f"about {duration(estimate)} for them at the FP model's pace" + (" plus the QAT steps" if cfg.qat_steps else "")
            + ("; --workers N runs N at once" if shard is None else ""))  # fmt: skip
    ptq = PTQConfig(init=cfg.init)
    tuner = None
    if cfg.qat_steps > 0 and todo:
        from bf.trainer.short_qat import ShortQAT, ShortQATConfig

        tuner = ShortQAT(pipe, ShortQATConfig(steps=cfg.qat_steps), log)
    for i, name in enumerate(todo):
        original = unet.get_submodule(name).weight.detach().clone()
        rec = {"shape": list(original.shape), "params": int(original.numel()), "bits": {}}
        try:
            for b in cfg.bits:
                grid = Grid(b, "balanced")
                layer = tuner.tune(unet, name, grid, cfg.init) if tuner else quantize_weight(name, original.cpu(), grid, ptq)
                with torch.no_grad():
                    unet.get_submodule(name).weight.copy_(torch.from_numpy(layer.dequantize()))
                imgs, lats, acc, score = jobs.run(pipe, cfg, clip)
                fid = fidelity(imgs, fp_imgs, lats, fp_lats)
                rec["bits"][str(b)] = {
                    "mse": fid["mse"],
                    "latent_mse": fid["latent_mse"],
                    "accuracy": acc,
                    "clip_score": score,
                    "semantic_drop": semantic_drop(fp_acc, acc, fp_clip, score),
                }
        finally:
            with torch.no_grad():
                unet.get_submodule(name).weight.copy_(original)
        result["layers"][name] = rec
        write_analysis(out, result)
        progress(len(names) - len(todo) + i + 1, len(names), name)
    result["complete"] = all(n in result["layers"] for n in candidates)
    write_analysis(out, result)
    return result


def write_analysis(out: Path, result: dict) -> None:
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
