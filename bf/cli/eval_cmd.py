"""bf eval: prompt faithfulness and fidelity of models on the same prompts and seeds."""

from __future__ import annotations

from pathlib import Path

import click

from bf.cli.checks import check_outputs, default_device, parse_guidance_scales
from bf.cli.options import DEVICE_OPTION
from bf.cli.output import log, progress_bar, write_json
from bf.scheduler_names import NATIVE_HELP, SCHEDULERS


@click.command("eval")
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Model directory, .bfq, or 'shipped' to evaluate (repeatable). Default: the shipped model.",
)
@click.option("--reference", help="Model (directory, .bfq or 'shipped') to compare against with identical seeds.")
@click.option("--base-model", type=click.Path(path_type=Path), help="Base model directory for a .bfq that was quantized without --bundle.")
@click.option(
    "--prompts",
    default="shapes-test",
    show_default=True,
    help="'shapes-test' (single, two, heldout, heldout-two splits, 30 scenes each), 'shapes-test:N' (N scenes per split, "
    "the first 30 the standard ones; at most the split's distinct scenes: single 150, heldout 30, two 840, heldout-two "
    "384), or a file, one prompt per line.",
)
@click.option("--cfg", "cfgs", default="3.5,5.5,7.5,9.5", show_default=True, help="Classifier-free guidance scales.")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True, help="Images per prompt.")
@click.option("--images-per-split", type=click.IntRange(0), default=0, show_default=True,
              help="At least this many images per split: a split with fewer prompts than that over --seeds gets more seeds "
              "(e.g. 600 gives held-out's 30 prompts 20 seeds each), so every split's interval is about as narrow.")  # fmt: skip
@click.option("--seed", type=int, default=1024, show_default=True, help="Seed of the first image of every prompt.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None, help=f"Sampler of the images. {NATIVE_HELP}")
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Use only the first N prompts of each split.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@DEVICE_OPTION
@click.option("--clip", "clip_dir", type=click.Path(path_type=Path), help="Local CLIP model directory: adds CLIP score.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write {\"results\": [...]} here ('-': stdout).")
@click.option(
    "--grid", "grid_out", type=click.Path(path_type=Path), help="Write an image grid (prompts down, models and CFG scales across)."
)
def command(
    models,
    reference,
    base_model,
    prompts,
    cfgs,
    seeds,
    images_per_split,
    seed,
    scheduler,
    steps,
    limit,
    batch_size,
    device,
    clip_dir,
    json_out,
    grid_out,
):
    """Prompt faithfulness and fidelity of generated images.

    For shapes prompts an object detector (checked on rendered ground truth) finds the
    objects and checks count, color, shape, size, position and relation against the
    prompt: accuracy per attribute and overall. With --reference: pixel MSE, PSNR
    (null in JSON when the images are identical) and latent MSE against the
    reference's images for the same seeds. A .bfq is evaluated through the same
    diffusers pipeline with its dequantized UNet.

    Overall accuracy and PSNR come with 95% intervals (bootstrap over prompts, all seeds of a
    prompt kept together; for a split whose prompts are all its scenes, over seeds alone), and
    every pair of models with the paired difference of overall accuracy on the same prompts and
    seeds and its interval; --json carries them, and each image's verdict (overall_per_image)
    for further comparisons.
    """
    import dataclasses

    from bf.evaluate.evaluation import EvalConfig, evaluate, paired_differences, prompt_sets, split_seeds
    from bf.models.diffusers_pipeline import load_model
    from bf.models.shipped import model_source
    from bf.report import format_eval_table, save_eval_grid

    device = default_device(device)
    cfg = EvalConfig(prompts=prompts, cfgs=parse_guidance_scales(cfgs), seeds=seeds, seed=seed, steps=steps, batch_size=batch_size,
                     limit=limit, images_per_split=images_per_split)  # fmt: skip
    check_outputs(json_out=json_out, grid_out=grid_out)
    sets = prompt_sets(prompts, limit)  # fail on a bad prompt file before loading models
    sources = [model_source(m) for m in models] or [model_source(None)]
    loaded = [load_model(s, scheduler, device, base_model, log=log) for s in sources]
    tok = loaded[0].pipe.tokenizer
    long = [p for ps in sets for p in ps.prompts if len(tok(p).input_ids) > tok.model_max_length]
    if long:
        log(f"warning: {len(long)} prompt(s) longer than {tok.model_max_length - 2} tokens are cut there "
            f"(the first: {long[0][:60]!r}...)")  # fmt: skip
    labels = [m.label for m in loaded]
    for i, m in enumerate(loaded):
        if labels.count(m.label) > 1:
            m.label = f"{m.label}#{i}"
    ref = None
    if reference:
        ref_source = model_source(reference)
        same = [m for s, m in zip(sources, loaded, strict=True) if s.resolve() == ref_source.resolve()]
        # A reference that is also evaluated shares its pipeline: its images are generated once.
        ref = dataclasses.replace(same[0]) if same else load_model(ref_source, scheduler, device, base_model, log=log)
        ref.label = f"reference:{ref.label}"
    clip = None
    if clip_dir is not None:
        from bf.evaluate.clip_score import ClipScorer

        clip = ClipScorer(clip_dir, device)
    pipes = {id(m.pipe) for m in [*loaded, *([ref] if ref is not None else [])]}
    total = sum(len(s.prompts) * len(split_seeds(cfg, len(s.prompts))) for s in sets) * len(cfg.cfgs) * len(pipes)
    with progress_bar(total=total, desc="generate", unit="img") as bar:
        results, generated = evaluate(loaded, ref, cfg, clip, progress=bar.update)
    differences = paired_differences(results)
    click.echo(format_eval_table(results, differences), err=json_out == Path("-"))  # stdout carries the JSON then
    if json_out is not None:
        settings = {"prompts": prompts, "cfg": list(cfg.cfgs), "seeds": seeds, "images_per_split": images_per_split, "limit": limit,
                    "seed": seed, "scheduler": scheduler or loaded[0].scheduler, "steps": steps, "models": [str(s) for s in sources],
                    "reference": str(reference) if reference else None, "device": device}  # fmt: skip
        # JSON has no infinity: identical images (PSNR inf) are written as null
        rows = [{**r, **({"psnr": None, "psnr_ci95": None} if r.get("psnr") == float("inf") else {})} for r in results]
        write_json(json_out, {"results": rows, "differences": differences, "config": settings})
    if grid_out is not None:
        save_eval_grid(grid_out, sets, generated, loaded, ref, cfg)
        log(f"wrote {grid_out}")
