"""bf train: the BitsFusion recipe (analysis, allocation, two-stage QAT) into a .bfq."""

from __future__ import annotations

from pathlib import Path

import click

from bf.cli.checks import check_new_model_dir, check_writable_file, default_device
from bf.cli.options import DEVICE_OPTION, MODEL_OPTION
from bf.cli.output import log, progress_bar
from bf.errors import BfError


@click.command("train")
@MODEL_OPTION
@click.option("--data", default="shapes", show_default=True, help="'shapes', or a directory of images with .txt captions / a .jsonl.")
@click.option("--images", type=click.IntRange(1), default=20_000, show_default=True, help="Training images (rendered, or read at most).")
@click.option("--target-bits", type=click.FloatRange(1.0, 8.0), default=1.99, show_default=True, help="Average bits (paper's count).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="Use this recipe instead of analysing and allocating.")
@click.option("--analysis", type=click.Path(path_type=Path), default=None, help="Allocate from this bf analyze result.")
@click.option("--uniform-bits", type=click.IntRange(1, 8), default=None, help="Every layer at this width (ablation baseline).")
@click.option("--grid", type=click.Choice(["balanced", "plain"]), default=None, help="Level grid [default: the recipe's, else balanced].")
@click.option("--init", type=click.Choice(["alt", "minmax"]), default="alt", show_default=True, help="Scale initialisation.")
@click.option("--no-feature-distill", is_flag=True, help="Stage I without the block-feature loss.")
@click.option("--timesteps", type=click.Choice(["beta", "uniform"]), default="beta", show_default=True, help="Training timestep sampling.")
@click.option("--no-stage2", is_flag=True, help="Stop after Stage I.")
@click.option("--stage1-steps", type=click.IntRange(0), default=2000, show_default=True)
@click.option("--stage2-steps", type=click.IntRange(0), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True, help="AdamW, constant.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=250, show_default=True, help="Steps between saved states.")
@click.option("--checkpoint-minutes", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Also save a state when this long has passed since the last one (a kill loses at most this much).")  # fmt: skip
@click.option("--work", type=click.Path(path_type=Path), default=None, help="Work directory (state, log.csv, recipe). Default: OUT.work/")
@click.option("--resume", is_flag=True, help="Continue from the state in --work.")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None, help="log.csv and TensorBoard events. Default: --work.")
@click.option("--bf16", is_flag=True, help="bf16 autocast (CUDA).")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute activations in the backward pass (less memory, more time).")
@click.option(
    "--cuda-graph",
    is_flag=True,
    help="Replay each training step from a CUDA graph: one GPU, one process; about 2x faster QAT steps on SD-v1.5 (host-bound eager).",
)
@DEVICE_OPTION
@click.option("--bundle", is_flag=True, help="Embed text encoder, VAE and small files in the .bfq.")
@click.option(
    "--fp-control",
    is_flag=True,
    help="Train the FP model itself with the same data, batch, learning rate, steps and losses, quantizing nothing: the "
    "same-budget control that QAT results are compared with. --out is then a model directory (bf eval --model takes it).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .bfq to write (with --fp-control: a model directory).")
def command(model_dir, data, images, target_bits, recipe, analysis, uniform_bits, grid, init, no_feature_distill, timesteps, no_stage2,
            stage1_steps, stage2_steps, batch_size, lr, seed, checkpoint_every, checkpoint_minutes, work, log_dir, resume, bf16,
            grad_checkpoint, cuda_graph, device, bundle, fp_control, out) -> None:  # fmt: skip
    """Quantization-aware training: a model and data in, a low-bit .bfq out.

    \b
    analyze -> allocate -> init -> Stage I -> Stage II -> pack:
      recipe     --recipe FILE, --uniform-bits B, or --analysis FILE allocated to
                 --target-bits (without any, every layer is analysed first: slow)
      Stage I    distillation from the FP model: noise + 0.01 x block features,
                 empty prompt 10% of the time, timesteps ~ Beta(3,1)
      Stage II   noise prediction against the true noise
    Ablation switches: --grid plain, --init minmax, --uniform-bits B,
    --no-feature-distill, --timesteps uniform, --no-stage2.
    Control: --fp-control trains the FP model the same way, quantizing nothing:
    its Stage I (a distillation from itself: zero loss and gradient) is
    skipped, and Stage II runs from a fresh optimizer.
    Several GPUs: torchrun --nproc_per_node N -m bf.cli train ... (DDP; --batch-size per GPU).
    """
    from bf.format import summarize
    from bf.models.directory import ModelDir
    from bf.models.shipped import model_source
    from bf.trainer.distributed import join_process_group
    from bf.trainer.qat import DEFAULT_FEATURE_WEIGHT, LossConfig
    from bf.trainer.train import TrainConfig
    from bf.trainer.training_run import TrainRequest, train_model

    if fp_control:
        ctx = click.get_current_context()
        given = [f"--{n.replace('_', '-')}" for n in ("target_bits", "init", "no_feature_distill")
                 if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]  # fmt: skip
        if given:  # settings of quantization or of Stage I, which the control skips
            raise BfError(f"--fp-control trains the FP model, which {', '.join(given)} would not change: drop them")
        check_new_model_dir(out)
    else:
        check_writable_file(out)  # before hours of training
    model = ModelDir.open(model_source(model_dir))
    device, rank = join_process_group(default_device(device))
    loss = LossConfig(feature_weight=0.0 if no_feature_distill else DEFAULT_FEATURE_WEIGHT, timesteps=timesteps)
    cfg = TrainConfig(
        stage1_steps=stage1_steps,
        stage2_steps=0 if no_stage2 else stage2_steps,
        batch_size=batch_size,
        lr=lr,
        loss=loss,
        init=init,
        seed=seed,
        checkpoint_every=checkpoint_every,
        checkpoint_minutes=checkpoint_minutes,
        bf16=bf16,
        grad_checkpoint=grad_checkpoint,
        cuda_graph=cuda_graph,
    )
    req = TrainRequest(
        data=data,
        images=images,
        target_bits=target_bits,
        recipe=recipe,
        uniform_bits=uniform_bits,
        analysis=analysis,
        grid=grid,
        train=cfg,
        device=device,
        bundle=bundle,
        log_dir=log_dir,
        fp_control=fp_control,
    )
    work = work or out.with_name(out.name + ".work")
    bars: dict[int, object] = {}

    def progress(stage, step, info):
        if stage not in bars:
            bars[stage] = progress_bar(total=info["steps"], initial=step - 1, desc=f"Stage {'I' if stage == 1 else 'II'}")
        bars[stage].update(1)
        bars[stage].set_postfix(loss=f"{info['loss']:.4g}")

    ckpt = train_model(model, req, work, resume, progress if rank == 0 else (lambda *a: None), log if rank == 0 else (lambda m: None))
    for b in bars.values():
        b.close()
    if rank != 0:  # the ranks hold identical students; rank 0 writes
        return
    if fp_control:
        from dataclasses import asdict

        from bf.models.directory import write_with_unet
        from bf.provenance import provenance

        training = {**asdict(cfg), "stage1_steps": 0, "stage1_steps_skipped": stage1_steps}
        note = {"fp_control": True, "base_model": str(model.root.resolve()), "data": data, "images": images, "training": training,
                "provenance": provenance()}  # fmt: skip
        write_with_unet(model, ckpt.state_dict(), out, note)
        log(f"wrote {out}: the FP model after Stage II ({stage2_steps} steps), the control for QAT runs of the same budget")
        log(f"training log: {log_dir or work}/log.csv")
        return
    ckpt.save(out)
    s = summarize(ckpt, out.stat().st_size)
    log(f"wrote {out}: {s['avg_bits']:.3f} avg bits (paper's count), {s['stored_bits_per_weight']:.3f} stored bits/weight")
    log(f"training log: {log_dir or work}/log.csv (TensorBoard: tensorboard --logdir {log_dir or work})")
