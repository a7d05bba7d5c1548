"""``bf train``: analyze -> allocate -> init -> Stage I -> Stage II -> pack, each reusable.

A recipe comes from ``--recipe``, ``--uniform-bits``, or an analysis (given, or run here
into the work directory and resumable) allocated to ``--target-bits``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bf.atomic import atomic_path
from bf.errors import BfError
from bf.format import Checkpoint, candidate_layers, quantizable_layers
from bf.models.diffusers_pipeline import text_parts
from bf.models.directory import ModelDir, bundle_from_model_dir
from bf.native_size import size_rule
from bf.trainer.allocate import DEFAULT_ETA, allocate, load_analysis
from bf.trainer.data import check_data, load_latents
from bf.trainer.frozen import conditioning_for, training_alphas_cumprod
from bf.trainer.qat import scale_health
from bf.trainer.recipe import load_recipe, plan_from_recipe, uniform_recipe
from bf.trainer.train import Frozen, TrainConfig, check_cuda_graph, check_work, pack_student, train_student


@dataclass(frozen=True)
class TrainRequest:
    data: str = "shapes"
    images: int = 20_000
    target_bits: float = 1.99
    recipe: Path | None = None
    uniform_bits: int | None = None
    analysis: Path | None = None
    grid: str | None = None  # balanced | plain; default: the recipe's, else balanced
    eta: float = DEFAULT_ETA
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "cpu"
    bundle: bool = False
    log_dir: Path | None = None  # log.csv and TensorBoard events; default: the work directory
    fp_control: bool = False  # train the FP model itself (no layer quantized): the same-budget control


def resolve_recipe(model: ModelDir, base: dict, shapes: dict, req: TrainRequest, work: Path, resume: bool, log) -> dict:
    """``base``: the model's path and content hash (hashing a real model takes a while: once per run)."""
    sources = [x is not None for x in (req.recipe, req.uniform_bits)]
    if sum(sources) > 1:
        raise BfError("give at most one of --recipe and --uniform-bits")
    grid = req.grid or "balanced"
    if req.recipe is not None:
        return load_recipe(req.recipe, req.grid)
    if req.uniform_bits is not None:
        return uniform_recipe(candidate_layers(shapes), req.uniform_bits, grid)
    if req.analysis is not None:
        analysis = load_analysis(req.analysis)
    else:
        from bf.models.diffusers_pipeline import load_model
        from bf.trainer.analyze import AnalyzeConfig, analyze

        out = work / "analysis.json"
        log(f"no --recipe or --analysis given: analysing every layer into {out} first (resumable with --resume; a GPU job "
            "for real models, see bf analyze --workers)")  # fmt: skip
        loaded = load_model(model.root, device=req.device)
        from bf.progress import progress_bar

        with progress_bar(desc="analyze", unit="layer", disable=None, file=sys.stderr) as bar:

            def progress(done: int, total: int, name: str) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            analysis = analyze(loaded.pipe, base, AnalyzeConfig(), out, resume or out.exists(), progress=progress, log=log)
    recipe = allocate(analysis, req.target_bits, eta=req.eta, grid=grid, source=str(req.analysis or "analysis"))
    with atomic_path(work / "recipe.json") as tmp:
        tmp.write_text(json.dumps(recipe, indent=1))
    log(f"allocated {req.target_bits} bits: {recipe['avg_bits']:.4f} (paper's count), {recipe['stored_bits_per_weight']:.4f} stored")
    return recipe


def train_model(
    model: ModelDir,
    req: TrainRequest,
    work: Path,
    resume: bool = False,
    progress: Callable[[int, int, dict], None] = lambda stage, step, info: None,
    log: Callable[[str], None] = lambda m: None,
) -> Checkpoint | torch.nn.Module:
    """The trained model: a Checkpoint, or with ``req.fp_control`` the trained FP UNet (torch module)."""

    check_work(work, resume)  # before the models load and the images are encoded
    check_data(req.data, req.images)
    if req.fp_control:
        check_fp_control(req)
    dist = torch.distributed
    check_cuda_graph(
        req.train, torch.device(req.device).type, dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    )
    created = not work.exists()
    try:
        return _train_model(model, req, work, resume, progress, log)
    except BaseException:
        if created and work.is_dir() and not any(work.iterdir()):  # a failed start leaves no empty directory
            work.rmdir()
        raise


def check_fp_control(req: TrainRequest) -> None:
    """The FP control quantizes nothing, and its Stage I would distil the FP model from itself."""
    given = [o for o, v in (("--recipe", req.recipe), ("--uniform-bits", req.uniform_bits), ("--analysis", req.analysis),
                            ("--grid", req.grid), ("--bundle", req.bundle or None)) if v is not None]  # fmt: skip
    if given:
        raise BfError(f"--fp-control trains the FP model, which has no recipe: drop {', '.join(given)}")
    if req.train.stage2_steps == 0:
        raise BfError("--fp-control without Stage II is the FP model itself (its Stage I distils it from itself: the loss and "
                      "its gradient are zero); give --stage2-steps")  # fmt: skip


def _train_model(model: ModelDir, req: TrainRequest, work: Path, resume: bool, progress, log):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    device = torch.device(req.device)
    unet_config = model.config("unet")
    teacher = UNet2DConditionModel.from_pretrained(
        model.root / "unet", torch_dtype=torch.float32, low_cpu_mem_usage=False, **model.variant("unet")
    ).to(device)
    shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    work.mkdir(parents=True, exist_ok=True)
    base = {"path": str(model.root.resolve()), "hash": model.content_hash()}
    if req.fp_control:
        recipe, plan = {}, {}
    else:
        recipe = resolve_recipe(model, base, shapes, req, work, resume, log)
        plan = plan_from_recipe(recipe, quantizable_layers(shapes), str(req.recipe or "recipe"))
    vae = (
        AutoencoderKL.from_pretrained(model.root / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False, **model.variant("vae"))
        .to(device)
        .eval()
    )
    size = size_rule(teacher.config, vae.config)[2]  # the size the model was trained at
    log(f"encoding {req.images if req.data == 'shapes' else 'up to ' + str(req.images)} training images ({req.data}, {size}x{size})")
    data = load_latents(req.data, vae, size, req.images, req.train.seed, log)
    del vae
    text = conditioning_for(text_parts(model), [teacher], device, size, model.model_index().get("force_zeros_for_empty_prompt", True))
    frozen = Frozen(teacher, text, data, training_alphas_cumprod(model.config("scheduler")).to(device))
    if req.fp_control:
        # Stage I distils the student from the teacher, and an FP student starts equal to it: zero loss and gradient,
        # so no step moves a weight. Skipped, Stage II starts from a fresh optimizer (run, AdamW's bias correction
        # after those zero steps would scale Stage II's first updates up, and any rounding difference between the two
        # forwards would become a full-size step).
        log(f"FP control: Stage I ({req.train.stage1_steps} steps) would leave the FP model as it is and is skipped; "
            f"Stage II {req.train.stage2_steps} steps from a fresh optimizer")  # fmt: skip
        student, _ = train_student(frozen, {}, replace(req.train, stage1_steps=0), work, resume, progress, log, req.log_dir)
        return student
    log(f"training {len(plan)} quantized layers: Stage I {req.train.stage1_steps} steps, Stage II {req.train.stage2_steps} steps")
    student, quants = train_student(frozen, plan, req.train, work, resume, progress, log, req.log_dir)
    _, held = scale_health(quants)
    if held:
        log(f"{held} learned scale(s) ended at their floor (weights of those rows are near zero)")
    training = {"data": req.data, "images": len(data.captions), **asdict(req.train), "scales_at_floor": held}
    if device.type == "cuda":  # this process's GPU (rank 0's under torchrun): what a run of this size needs per GPU
        training["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        log(f"peak GPU memory {training['peak_gpu_memory_bytes'] / 1e9:.2f} GB")
    meta = {**recipe, "init": req.train.init, "training": training}
    return pack_student(student, quants, unet_config, base, meta, bundle_from_model_dir(model) if req.bundle else None)
