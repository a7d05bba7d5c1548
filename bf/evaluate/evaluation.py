"""The evaluation loop behind ``bf eval``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bf.errors import BfError
from bf.evaluate.frechet import fd_to_rendered, rendered_truth
from bf.evaluate.generate import generate
from bf.evaluate.intervals import mean_ci, paired_difference, psnr_ci
from bf.evaluate.metrics import accuracy_of, fidelity, image_mse, verdicts
from bf.shapes.scenes import (
    HELDOUT_PAIRS,
    SPACE_SIZE,
    SPLITS,
    TEST_SCENES,
    Scene,
    caption,
    eval_scenes,
    parse_prompt,
    split_space,
)

SHAPES_TEST = "shapes-test"
MIN_FD_IMAGES = 30  # the distance to rendered ground truth is reported from this many images per split on


@dataclass(frozen=True)
class EvalConfig:
    prompts: str = SHAPES_TEST
    cfgs: tuple[float, ...] = (3.5, 5.5, 7.5, 9.5)
    seeds: int = 1
    seed: int = 1024
    steps: int = 50
    batch_size: int = 16
    limit: int | None = None  # prompts per split
    images_per_split: int = 0  # at least this many images per split: a split of fewer prompts gets more seeds


def split_seeds(cfg: EvalConfig, prompts: int) -> list[int]:
    """The seeds every prompt of a split of ``prompts`` prompts is generated with: ``cfg.seeds`` of them, or as many as
    ``cfg.images_per_split`` needs."""
    count = max(cfg.seeds, -(-cfg.images_per_split // max(prompts, 1)))
    return [cfg.seed + k for k in range(count)]


@dataclass
class Generated:
    images: np.ndarray
    latents: np.ndarray
    seconds: float = 0.0  # generating them


@dataclass
class PromptSet:
    split: str
    prompts: list[str]
    scenes: list[Scene | None]
    extra: dict = field(default_factory=dict)


def shapes_test_size(spec: str) -> int | None:
    """Scenes per split of a 'shapes-test' or 'shapes-test:N' spec (None: not a shapes-test spec)."""
    if spec == SHAPES_TEST:
        return TEST_SCENES
    head, sep, n = spec.partition(":")
    if head != SHAPES_TEST or not sep:
        return None
    if not n.isdigit() or int(n) < 1:
        raise BfError(f"--prompts {spec}: '{SHAPES_TEST}:N' takes a positive number of prompts per split, e.g. {SHAPES_TEST}:200")
    return int(n)


def prompt_sets(spec: str, limit: int | None = None) -> list[PromptSet]:
    """The prompts of ``spec`` by split: 'shapes-test' (30 scenes per split), 'shapes-test:N' (the first N scenes of
    each split, all of a smaller split), or a file (split by what each line describes)."""
    if (n := shapes_test_size(spec)) is not None:
        scenes = {s: eval_scenes(s, n) for s in SPLITS}
        sets = [PromptSet(s, [caption(sc) for sc in scenes[s]], scenes[s]) for s in SPLITS]
    else:
        path = Path(spec)
        if not path.is_file():
            raise BfError(f"--prompts {spec}: neither '{SHAPES_TEST}[:N]' nor a prompt file (one prompt per line)")
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise BfError(f"{path}: not a UTF-8 text file (byte {e.start}); save the prompts as UTF-8, one per line") from None
        if not lines:
            raise BfError(f"{path}: no prompts in the file")
        by_split: dict[str, PromptSet] = {}
        for ln in lines:
            sc = parse_prompt(ln)
            split = "other" if sc is None else "single" if len(sc.objects) == 1 else "two"
            ps = by_split.setdefault(split, PromptSet(split, [], []))
            ps.prompts.append(ln)
            ps.scenes.append(sc)
        sets = list(by_split.values())
    if limit:
        sets = [PromptSet(s.split, s.prompts[:limit], s.scenes[:limit]) for s in sets]
    return sets


def evaluate(models, reference, cfg: EvalConfig, clip=None, progress=None) -> tuple[list[dict], dict]:
    """Results (one per model, CFG scale and split) and every generation, for grids."""
    sets = prompt_sets(cfg.prompts, cfg.limit)
    generated: dict[tuple[str, float, str], Generated] = {}
    by_pipe: dict[tuple[int, float, str], Generated] = {}  # a model that is also the reference is generated once

    def run(model, scale, ps):
        key, same = (model.label, scale, ps.split), (id(model.pipe), scale, ps.split)
        if same not in by_pipe:
            jobs = [(p, s) for p in ps.prompts for s in split_seeds(cfg, len(ps.prompts))]
            t0 = time.perf_counter()
            imgs, lats = generate(model.pipe, jobs, scale, cfg.steps, cfg.batch_size, on_batch=progress or (lambda n: None))
            by_pipe[same] = Generated(imgs, lats, time.perf_counter() - t0)
        generated[key] = by_pipe[same]
        return generated[key]

    results = []
    for scale in cfg.cfgs:
        for ps in sets:
            ref = run(reference, scale, ps) if reference is not None else None
            seeds = split_seeds(cfg, len(ps.prompts))
            scenes = [sc for sc in ps.scenes for _ in seeds]
            prompts = [p for p in ps.prompts for _ in seeds]
            grid = (len(ps.prompts), len(seeds))  # images are prompt-major: the seeds of prompt 0, then of prompt 1, ...
            whole = _whole_split(ps)
            for model in models:
                out = run(model, scale, ps)
                t0 = time.perf_counter()
                judged = verdicts(out.images, scenes)
                entry = {
                    "model": model.label,
                    "cfg": scale,
                    "split": ps.split,
                    "images": len(out.images),
                    "seeds": len(seeds),
                    "accuracy": accuracy_of(judged),
                }
                if judged and all(v is not None for v in judged):
                    overall = np.array([float(v["overall"]) for v in judged]).reshape(grid)
                    entry["accuracy_ci95"] = mean_ci(overall, whole)
                    entry["whole_split"] = whole
                    entry["overall_per_image"] = overall.ravel().tolist()
                    h, w = out.images.shape[1:3]
                    # the renderer draws squares; a handful of images gives a covariance of noise, not a distance
                    if len(out.images) >= MIN_FD_IMAGES and h == w and h % 4 == 0:
                        entry["fd_rendered"] = fd_to_rendered(out.images, ps.scenes)
                        entry["fd_rendered_floor"] = _fd_floor(ps.scenes, len(seeds), out.images.shape[1])
                if ref is not None:
                    entry.update(fidelity(out.images, ref.images, out.latents, ref.latents))
                    entry["reference"] = reference.label
                    mse = image_mse(out.images, ref.images)
                    entry["psnr_ci95"] = psnr_ci(mse.reshape(grid), whole)
                    entry["mse_per_image"] = [float(x) for x in mse]  # for intervals over several splits (tools/ablation.py)
                if clip is not None:
                    entry["clip_score"] = clip(out.images, prompts)
                # where an evaluation's time goes (a model that is also the reference shares its generation)
                entry["seconds"] = {"generate": round(out.seconds, 3), "metrics": round(time.perf_counter() - t0, 3)}
                results.append(entry)
    return results, generated


def _whole_split(ps: PromptSet) -> bool:
    """Whether the prompts are every scene of their shapes split (its accuracy then varies with the seeds alone): all
    of a small split's scenes, or every distinct caption of a two-object split (sizes unnamed: a caption is a prompt)."""
    return whole_split(ps.split, ps.scenes)


def whole_split(split: str, scenes: list) -> bool:
    """``_whole_split`` for a split's name and scenes (None: a prompt that is no shapes caption)."""
    if split not in SPLITS or any(sc is None for sc in scenes):
        return False
    space = split_space(split)
    if space is not None:
        return set(scenes) == set(space)
    captions = [caption(sc) for sc in scenes]
    return len(captions) == len(set(captions)) == SPACE_SIZE[split] and all(_in_split(split, sc) for sc in scenes)


def _in_split(split: str, scene: Scene) -> bool:
    """Whether a two-object scene belongs to ``split`` ("two": training pairs only; "heldout-two": a held-out one)."""
    held = any(pair in HELDOUT_PAIRS for pair in scene.pairs)
    return len(scene.objects) == 2 and held == (split == "heldout-two")


def paired_differences(results: list[dict]) -> list[dict]:
    """Overall accuracy of each model minus each model listed before it, at every CFG scale and split,
    paired on the same prompts and seeds (each result's ``seeds`` per prompt), with its 95% interval
    (bf.evaluate.intervals)."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "overall_per_image" in r:
            groups.setdefault((r["cfg"], r["split"]), []).append(r)
    for (scale, split), rows in groups.items():
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                va, vb = (np.array(r["overall_per_image"]).reshape(-1, r["seeds"]) for r in (a, b))
                out.append({"cfg": scale, "split": split, "a": a["model"], "b": b["model"], "metric": "overall accuracy, b - a"}
                           | paired_difference(va, vb, a.get("whole_split", False)))  # fmt: skip
    return out


def _fd_floor(scenes: list, draws: int, resolution: int) -> float:
    """The distance a perfect generator gets: other renderings of the same scenes (fd_to_rendered's floor)."""
    key = (tuple(scenes), draws, resolution)
    if key not in _FLOORS:
        _FLOORS[key] = fd_to_rendered(rendered_truth(scenes, draws, resolution, seed=1), scenes)
    return _FLOORS[key]


_FLOORS: dict = {}
