"""Two-stage quantization-aware training (docs/RECIPE.md section 5) and packing the result.

Stage I distils the fake-quantized student from the frozen FP teacher; Stage II trains
it on the true noise. Batches are drawn from a generator seeded by (seed, stage, step),
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bf.atomic import atomic_path
from bf.errors import BfError
from bf.format import Checkpoint, Grid
from bf.provenance import provenance
from bf.trainer.data import LatentSet
from bf.trainer.event_log import EventLog
from bf.trainer.graph_step import GraphedStep
from bf.trainer.ptq import kept_tensors
from bf.trainer.qat import (
    SCALE_FLOOR,
    LossConfig,
    attach_fake_quant,
    drop_text,
    export_layers,
    hold_scales,
    loss_parts,
    sample_timesteps,
    scale_health,
    stage1_terms,
    stage2_terms,
)
from bf.trainer.train_state import load_state, save_state

STATE_FILE = "state.safetensors"
LOG_FILE = "log.csv"


_NOT_IN_DIGEST = ("checkpoint_every", "checkpoint_minutes", "grad_checkpoint", "cuda_graph")  # change how a run goes, not what it computes


@dataclass(frozen=True)
class TrainConfig:
    stage1_steps: int = 2000
    stage2_steps: int = 1000  # 0: no Stage II
    batch_size: int = 64
    lr: float = 1e-4  # constant, as in the paper (which uses 1e-5 at batch 256-1024 on SD-v1.5)
    loss: LossConfig = field(default_factory=LossConfig)
    init: str = "alt"
    seed: int = 0
    checkpoint_every: int = 250
    checkpoint_minutes: float = 5.0  # a state is also saved when this long has passed since the last one
    bf16: bool = False  # autocast on CUDA
    grad_checkpoint: bool = False  # recompute block activations in the backward pass: less memory, about 30% more time
    cuda_graph: bool = False  # replay each stage's step from a CUDA graph (trainer/graph_step.py); one process only

    def same_run(self) -> dict:
        """The settings that make two runs the same run (saved with the state, to name what differs)."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_IN_DIGEST}

    def digest(self, plan: dict[str, Grid]) -> str:
        """Hash of everything that makes two runs the same run (resume refuses a different one)."""
        canon = json.dumps({"cfg": self.same_run(), "plan": {k: [g.bits, g.kind] for k, g in sorted(plan.items())}}, sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]


@dataclass
class Frozen:
    """What the loop needs besides the student: teacher, text encoder, data."""

    teacher: torch.nn.Module
    encode_text: Callable[[list[str]], torch.Tensor]  # captions -> encoder hidden states (no grad)
    data: LatentSet
    alphas_cumprod: torch.Tensor  # one per training timestep


GRAD_CLIP = 1.0  # max gradient norm


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW with a constant rate and no weight decay (the latent weights must stay where QAT puts them)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """Backward, clip the gradient norm of the optimizer's parameters, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], GRAD_CLIP)
    opt.step()


def noisy_batch(frozen: Frozen, empty: torch.Tensor, batch_size: int, loss: LossConfig, g: torch.Generator, device):
    """One training batch drawn with ``g``: (noisy latents, timesteps, text condition, noise).

    Captions are dropped to the empty prompt with ``loss.p_uncond``; timesteps follow ``loss.timesteps``."""
    idx = torch.randint(0, len(frozen.data.captions), (batch_size,), generator=g)
    z0 = frozen.data.latents[idx.to(frozen.data.latents.device)].to(device).float()
    cond = drop_text(frozen.encode_text([frozen.data.captions[i] for i in idx.tolist()]), empty, loss.p_uncond, g)
    t = sample_timesteps(batch_size, loss.timesteps, len(frozen.alphas_cumprod), generator=g).to(device)
    noise = torch.randn(z0.shape, generator=g).to(device)
    a = frozen.alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, cond, noise


def _stages(cfg: TrainConfig) -> list[tuple[int, int]]:
    return [(s, n) for s, n in ((1, cfg.stage1_steps), (2, cfg.stage2_steps)) if n > 0]


class CsvLog:
    """log.csv: one row per step. ``resume_at`` (stage, step) of a resumed run keeps the rows up to the
    saved state (later ones are trained again and rewritten) and continues their seconds column."""

    HEADER = ("stage", "step", "loss", "noise", "feature", "lr", "seconds")

    def __init__(self, path: Path, resume_at: tuple[int, int] | None = None):
        kept = []
        if resume_at is not None and path.is_file():
            with open(path, newline="") as f:
                kept = [r for r in list(csv.reader(f))[1:] if len(r) == len(self.HEADER) and (int(r[0]), int(r[1])) <= resume_at]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:  # a fresh run starts a fresh log
            csv.writer(f).writerows([self.HEADER, *kept])
        self.seconds_before = float(kept[-1][-1]) if kept else 0.0
        self.f = open(path, "a", newline="")  # noqa: SIM115 - kept open for the whole run
        self.w = csv.writer(self.f)

    def write(self, stage, step, loss, parts, lr, seconds):
        self.w.writerow([stage, step, f"{loss:.6g}", f"{parts.get('noise', 0):.6g}", f"{parts.get('feature', 0):.6g}", lr,
                         f"{self.seconds_before + seconds:.2f}"])  # fmt: skip
        self.f.flush()

    def close(self):
        self.f.close()


def _differences(saved: dict | None, now: dict) -> str:
    """What differs between a saved state's settings and this run's, in words."""
    if saved is None:  # a state saved before the settings were kept
        return "other settings or another recipe"
    now = json.loads(json.dumps(now))  # as saved: tuples become lists
    diff = [f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return "other settings: " + ", ".join(diff) if diff else "another recipe (other layers or bit widths)"


def check_cuda_graph(cfg: TrainConfig, device_type: str, world: int) -> None:
    if cfg.cuda_graph and (device_type != "cuda" or world > 1):
        raise BfError("--cuda-graph needs one CUDA GPU and one process (not CPU, not torchrun)")


def check_work(work: Path, resume: bool) -> None:
    """--resume needs a saved state in ``work``, and a run without it must not overwrite one."""
    state = work / STATE_FILE
    if resume and not state.is_file():
        raise BfError(f"--resume: {work} holds no training state ({STATE_FILE}) to continue; run without --resume to start")
    if not resume and state.exists():
        raise BfError(f"{work} has a training state; pass --resume to continue it, or use another --work")


def train_student(
    frozen: Frozen,
    plan: dict[str, Grid],
    cfg: TrainConfig,
    work: Path,
    resume: bool = False,
    progress: Callable[[int, int, dict], None] = lambda stage, step, info: None,
    log: Callable[[str], None] = lambda m: None,
    log_dir: Path | None = None,
) -> tuple[torch.nn.Module, dict]:
    """The trained student (fake-quant UNet) and its fake-quant modules' registry.

    Losses go to ``log_dir`` (default ``work``) as log.csv and a TensorBoard event file.
    """
    device = frozen.alphas_cumprod.device
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    check_cuda_graph(cfg, device.type, world)  # before anything is written to work or log_dir
    teacher = frozen.teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    quants = attach_fake_quant(student, plan, cfg.init)
    if cfg.grad_checkpoint:
        student.enable_gradient_checkpointing()
    opt = make_optimizer(student, cfg.lr)
    # Under torchrun every rank trains the same student on its own batches; DDP averages the
    # gradients, so the ranks stay identical and rank 0 alone writes state and log.
    rank = dist.get_rank() if world > 1 else 0
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_FILE
    digest = cfg.digest(plan)
    start = {"stage": _stages(cfg)[0][0] if _stages(cfg) else 2, "step": 0}
    check_work(work, resume)
    if resume:
        meta = load_state(state_path, student, opt)
        if meta.get("digest") != digest:
            raise BfError(
                f"{state_path} was made with {_differences(meta.get('settings'), cfg.same_run())}; use them again, or another --work"
            )
        start = {"stage": meta["stage"], "step": meta["step"]}
        log(f"resuming at Stage {start['stage']}, step {start['step']}")
    forward = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student  # after loading: every rank equal
    empty = frozen.encode_text([""])
    log_dir = log_dir or work
    steps_before = {1: 0, 2: cfg.stage1_steps}  # TensorBoard: one x axis over both stages
    if rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        csv_log = CsvLog(log_dir / LOG_FILE, (start["stage"], start["step"]) if resume else None)
        run = "bf-" + hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:8]  # this work directory's run
        events = EventLog(log_dir, run, steps_before[start["stage"]] + start["step"] if resume else None)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    def terms(stage: int, zt, t, cond, noise) -> tuple[torch.Tensor, ...]:
        with autocast:
            if stage == 1:
                return stage1_terms(forward, teacher, zt, t, cond, cfg.loss)
            return stage2_terms(forward, zt, t, cond, noise)

    def update(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        optimizer_step(loss, opt)
        hold_scales(quants)

    graphs: dict[int, GraphedStep] = {}
    held_before = 0
    t0, saved_at = time.time(), time.monotonic()
    try:
        for stage, steps in _stages(cfg):
            if stage < start["stage"]:
                continue
            first = start["step"] + 1 if stage == start["stage"] else 1
            for step in range(first, steps + 1):
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage * 100_000_007 + step + rank * 7_919_000_003)
                zt, t, cond, noise = noisy_batch(frozen, empty, cfg.batch_size, cfg.loss, g, device)
                if cfg.cuda_graph:  # the step runs before its loss is seen: a NaN stops the run with the last saved state
                    if stage not in graphs:
                        graphs[stage] = GraphedStep(lambda *b, stage=stage: terms(stage, *b), opt, update, (zt, t, cond, noise))
                    parts = loss_parts(stage, graphs[stage](zt, t, cond, noise))
                else:
                    step_terms = terms(stage, zt, t, cond, noise)
                    parts = loss_parts(stage, step_terms)
                value = parts["loss"]
                if not math.isfinite(value):
                    raise BfError(
                        f"loss is {value} at Stage {stage} step {step}; stopped, the last good state is {state_path} "
                        "(try a lower --lr, then --resume)"
                    )
                if not cfg.cuda_graph:
                    update(step_terms[0], opt)
                progress(stage, step, {"steps": steps, "loss": value, **parts})
                if rank != 0:
                    continue
                csv_log.write(stage, step, value, parts, cfg.lr, time.time() - t0)
                events.scalars(steps_before[stage] + step, {f"stage{stage}/{k}": v for k, v in parts.items()})
                # By steps, and by time: on a CPU 250 default steps of the shipped model take about 11 minutes.
                due = time.monotonic() - saved_at >= 60 * cfg.checkpoint_minutes
                if step % cfg.checkpoint_every == 0 or step == steps or due:
                    # A state is saved only while every learned scale can still be packed, so the run stops
                    # within one checkpoint interval of a bad scale, not at packing after the last step.
                    bad, held = scale_health(quants)
                    if bad:
                        where = state_path if state_path.exists() else "none was saved yet"
                        raise BfError(f"at Stage {stage} step {step}, {bad} learned scale(s) are not finite; stopped, "
                                      f"the last good state is {where} (try a lower --lr, then --resume)")  # fmt: skip
                    if held != held_before:
                        log(f"Stage {stage} step {step}: {held} learned scale(s) held at their floor "
                            f"({SCALE_FLOOR:g} of the initial scale; a lower --lr moves scales less per step)")  # fmt: skip
                        held_before = held
                    save_state(state_path, student, opt, {"stage": stage, "step": step, "digest": digest, "settings": cfg.same_run()})
                    saved_at = time.monotonic()
    finally:
        if rank == 0:
            csv_log.close()
            events.close()
    return student, quants


def pack_student(student: torch.nn.Module, quants: dict, unet_config: dict, base_model: dict, recipe: dict, bundle=None) -> Checkpoint:
    """The .bfq of a trained student: packed layers with learned scales, trained biases and norms."""
    layers = export_layers(student, quants)
    tensors = kept_tensors({k: v for k, v in student.state_dict().items() if ".parametrizations." not in k}, set())
    return Checkpoint(
        unet_config=unet_config,
        layers=layers,
        tensors=tensors,
        base_model=base_model,
        recipe=recipe,
        provenance=provenance(),
        bundle=bundle,
    )
