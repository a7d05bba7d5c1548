"""bf analyze: per-layer sensitivity, the input of bf allocate."""

from __future__ import annotations

from pathlib import Path

import click

from bf.cli.checks import check_outputs, default_device, parse_bit_widths
from bf.cli.options import DEVICE_OPTION, MODEL_OPTION
from bf.cli.output import log, progress_bar
from bf.errors import BfError
from bf.scheduler_names import NATIVE_HELP, SCHEDULERS, native_scheduler


@click.command("analyze")
@MODEL_OPTION
@click.option("--bits", "bits_text", default="1,2,3", show_default=True, help="Widths to try for every layer.")
@click.option("--prompts", default="shapes-test", show_default=True, help="'shapes-test' or a prompt file, one per line.")
@click.option("--limit", type=click.IntRange(1), default=4, show_default=True, help="Prompts per split.")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True, help="Images per prompt.")
@click.option("--cfg", "cfg_scale", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None, help=f"Sampler of the images. {NATIVE_HELP}")
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True, help="Sampling steps per image.")
@click.option("--layers", "layer_regex", default=None, help="Only layers whose name matches this regular expression.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--qat-steps",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Tune each quantized layer alone by this many Stage I steps (batch 8) before judging it; 0: post-training only.",
)
@click.option(
    "--clip",
    "clip_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Local CLIP model directory: record CLIP scores; the semantic drop of non-shapes prompts is the CLIP-score drop.",
)
@DEVICE_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Analysis JSON (rewritten after every layer).")
@click.option("--resume", is_flag=True, help="Continue an interrupted analysis in --out.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Also draw per-layer MSE and semantic drop (PNG).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes sharing the machine, each analysing every N-th layer (a small model leaves a GPU idle in one process).",
)
@click.option("--shard", default=None, help="K/N: analyse only every N-th layer from the K-th (to spread one analysis over machines).")
def command(model_dir, bits_text, prompts, limit, seeds, cfg_scale, scheduler, steps, layer_regex, batch_size, qat_steps, clip_dir,
            device, out, resume, plot, workers, shard) -> None:  # fmt: skip
    """Per-layer sensitivity: every candidate layer alone at each width.

    Each layer is quantized alone (balanced grid, alternating init) while the rest
    stays full precision; images from fixed prompts and seeds are compared with the
    FP model's (pixel MSE) and judged (accuracy drop on shapes prompts, CLIP-score
    drop on others with --clip). --qat-steps K trains each quantized layer alone for
    K steps first (the paper's setting; K x layers x widths training steps). The input of
    'bf allocate'. Costs layers x widths x images generations: use a GPU for real
    models, --layers / --limit / --steps for quick looks.
    """
    from bf.evaluate.evaluation import prompt_sets
    from bf.models.directory import ModelDir
    from bf.models.shipped import model_source
    from bf.trainer.analyze import AnalyzeConfig, check_resumable, layer_pattern, parse_shard

    shard_kn = parse_shard(shard) if shard is not None else None
    if workers > 1 and shard_kn is not None:
        raise BfError("give --workers or --shard, not both")
    check_outputs(out=out, plot=plot)
    root = ModelDir.open(model_source(model_dir))
    scheduler = scheduler or native_scheduler(root.config("scheduler"))
    cfg = AnalyzeConfig(
        bits=parse_bit_widths(bits_text),
        prompts=prompts,
        limit=limit,
        seeds=seeds,
        cfg=cfg_scale,
        scheduler=scheduler,
        steps=steps,
        batch_size=batch_size,
        layers=layer_regex,
        qat_steps=qat_steps,
        clip=str(clip_dir.resolve()) if clip_dir is not None else None,
    )
    if clip_dir is not None:
        from bf.evaluate.clip_score import check_clip_dir

        check_clip_dir(clip_dir)
    layer_pattern(layer_regex)
    prompt_sets(prompts, limit)  # a bad prompt file fails here, not after the model loads
    model = {"path": str(root.root.resolve()), "hash": root.content_hash()}
    check_resumable(out, cfg, model, resume)
    device = default_device(device)
    bar = progress_bar(desc="analyze", unit="layer")
    if workers > 1:
        from bf.trainer.analyze_workers import AnalyzeJob, run_workers

        def progress_all(done):
            bar.n = done
            bar.refresh()

        result = run_workers(AnalyzeJob(str(root.root), model, cfg, device), workers, out, resume, progress_all, log)
    else:
        from bf.models.diffusers_pipeline import load_model
        from bf.trainer.analyze import analyze

        def progress(done, total, name):
            bar.total = total
            bar.n = done
            bar.set_postfix_str(name[-40:])
            bar.refresh()

        loaded = load_model(root.root, scheduler=scheduler, device=device)
        result = analyze(loaded.pipe, model, cfg, out, resume, shard=shard_kn, progress=progress, log=log)
    bar.close()
    n, total = len(result["layers"]), len(result["candidates"])
    log(f"wrote {out}: {n} of {total} layers analysed" + ("" if n == total else " (finish with --resume, then bf allocate)"))
    if plot is not None:
        from bf.plots import plot_analysis

        plot_analysis(result, plot)
        log(f"wrote {plot}")
