"""The ``bf`` command line: the only place where stages are wired together."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

import bf
from bf.errors import BfError
from bf.scheduler_names import SCHEDULERS


class _Group(click.Group):
    """Turns BfError, a missing optional dependency and a usage error into one line on stderr."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from bf.provenance import set_command

        set_command(sys.argv[1:] if args is None else list(args))
        try:
            return self._main(args, prog_name, complete_var, standalone_mode, **extra)
        finally:
            set_command(None)

    def _main(self, args, prog_name, complete_var, standalone_mode, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.exceptions.NoArgsIsHelpError as e:  # plain `bf`: the help, not an error
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:  # click's own is four lines (usage, hint, blank, error)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)  # --help and --version return their exit code

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BfError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in _EXTRAS:
                click.echo(f"error: this command needs {e.name}: pip install 'bf[{_EXTRAS[e.name.split('.')[0]]}]'", err=True)
                sys.exit(1)
            raise
        except OSError as e:  # disk full, permission denied, a directory where a file goes
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


_EXTRAS = {"torch": "train", "diffusers": "train", "transformers": "train", "matplotlib": "plot", "onnx": "export", "onnxruntime": "export"}


def _progress(desc: str):
    from bf.progress import progress_bar

    return lambda it: progress_bar(it, desc=desc, unit="layer", disable=None, file=sys.stderr)


def _log(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(bf.__version__, prog_name="bf")
def main() -> None:
    """bf: BitsFusion toolchain. Quantize a Stable Diffusion UNet to ~2 bits per weight, export and run it.

    Without --model, every command uses the small text-to-image model shipped in the package.

    \b
    Typical flow:
      bf quantize --bits 2 --out m.bfq               # post-training quantization, seconds on a CPU
      bf train --out m.bfq                           # or the BitsFusion recipe (analysis + QAT; a GPU job)
      bf inspect m.bfq                               # sizes and bits per layer
      bf export m.bfq --target onnx-std --out onnx   # ONNX graphs, checked against PyTorch
      bf export m.bfq --target trt-rtx --out rtx     # TensorRT for RTX engines, built on any machine
      bf infer onnx --prompt "a red circle" --out img.png
      bf bench onnx                                  # sizes and latency against the FP model
    """
    # transformers and diffusers print optional-dependency advice (torchvision), weight-loading bars and,
    # for a long prompt, its whole truncated tail: bf says what matters in its own lines.
    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@main.command("random-model")
@click.option(
    "--arch",
    type=click.Choice(["sd15", "sd15-tiny"]),
    default="sd15-tiny",
    show_default=True,
    help="sd15: SD-v1.5's exact architecture (859.52M UNet parameters); sd15-tiny: same block types, tiny width.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random initialisation.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Precision the weights are saved in.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to create (diffusers layout).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def random_model(arch: str, seed: int, dtype: str, out: Path, force: bool) -> None:
    """Write a randomly initialised text-to-image model in diffusers layout.

    For size and speed work without pretrained weights, and for tests. The directory
    has unet/, text_encoder/, tokenizer/ (the real CLIP vocabulary), vae/, scheduler/
    (PNDM, SD-v1.5 settings) and model_index.json, and loads with diffusers'
    StableDiffusionPipeline.from_pretrained.
    """
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model

    if out.exists() and not force:
        raise BfError(f"{out} already exists; pass --force to replace it")
    write_random_model(ARCHITECTURES[arch], out, seed, dtype, overwrite=force, log=_log)
    _log(f"wrote {arch} model to {out}")


@main.command()
@click.option(
    "--model",
    "model_dir",
    default=None,
    help="Local diffusers Stable Diffusion directory (model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/). "
    "Default: the shipped model.",
)
@click.option("--bits", type=click.IntRange(1, 8), help="Quantize every layer to this width (conv_in/conv_out: 8 bits).")
@click.option("--recipe", type=click.Path(path_type=Path), help="Per-layer bit widths (JSON keyed by module name).")
@click.option(
    "--grid",
    type=click.Choice(["balanced", "plain"]),
    default=None,
    help="balanced: 2^b+1 symmetric levels (BitsFusion); plain: 2^b levels (LSQ baseline). Default: balanced.",
)
@click.option(
    "--init",
    type=click.Choice(["alt", "minmax"]),
    default="alt",
    show_default=True,
    help="Scale init: alternating optimisation of ||s*q - w||, or min-max.",
)
@click.option("--iters", type=click.IntRange(0, 1000), default=10, show_default=True, help="Iterations of the alternating init.")
@click.option(
    "--bundle", is_flag=True, help="Also embed text encoder and VAE (fp16), tokenizer and scheduler: one file is enough to export."
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .bfq file to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def quantize(
    model_dir: str | None, bits: int | None, recipe: Path | None, grid: str | None, init: str, iters: int, bundle: bool, out: Path,
    force: bool,
) -> None:  # fmt: skip
    """Post-training quantization of the UNet into a packed .bfq checkpoint.

    Every conv/linear weight except the time-embedding layers is quantized per
    output channel; the time layers, biases and norms are kept. No training: the
    checkpoint is the starting point of 'bf train' and a baseline.
    """
    from bf.format import summarize
    from bf.models.directory import ModelDir
    from bf.models.shipped import model_source
    from bf.trainer.ptq import PTQConfig
    from bf.trainer.quantize_model import QuantizeRequest, quantize_model

    _check_new_file(out, force)
    model = ModelDir.open(model_source(model_dir))
    req = QuantizeRequest(bits=bits, recipe=recipe, grid=grid, ptq=PTQConfig(init=init, iters=iters), bundle=bundle)
    ckpt = quantize_model(model, req, progress=_progress("quantize"), log=_log)
    ckpt.save(out)
    s = summarize(ckpt, out.stat().st_size)
    _log(
        f"wrote {out}: {s['quantized_layers']} layers, {s['avg_bits']:.3f} avg bits (paper's count), "
        f"{s['stored_bits_per_weight']:.3f} stored bits/weight, UNet {s['unet_bytes'] / 1e6:.2f} MB "
        f"({s['ratio_vs_fp16']:.2f}x smaller than FP16)"
    )


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated bit widths, e.g. 1,2,3", param_hint="--bits") from None
    if not bits or not all(1 <= b <= 8 for b in bits):
        raise click.BadParameter(f"{text!r}: widths must be in 1..8", param_hint="--bits")
    return bits


@main.command()
@click.option("--model", "model_dir", default=None, help="Model directory or 'shipped'. Default: the shipped model.")
@click.option("--bits", "bits_text", default="1,2,3", show_default=True, help="Widths to try for every layer.")
@click.option("--prompts", default="shapes-test", show_default=True, help="'shapes-test' or a prompt file, one per line.")
@click.option("--limit", type=click.IntRange(1), default=4, show_default=True, help="Prompts per split.")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True, help="Images per prompt.")
@click.option("--cfg", "cfg_scale", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="pndm", show_default=True)
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
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
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
def analyze(model_dir, bits_text, prompts, limit, seeds, cfg_scale, scheduler, steps, layer_regex, batch_size, qat_steps, clip_dir,
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
    import torch

    from bf.models.diffusers_pipeline import load_model
    from bf.models.directory import ModelDir
    from bf.models.shipped import model_source
    from bf.progress import progress_bar
    from bf.trainer.analyze import AnalyzeConfig, check_resumable, layer_pattern, parse_shard
    from bf.trainer.analyze import analyze as run_analysis

    shard_kn = parse_shard(shard) if shard is not None else None
    if workers > 1 and shard_kn is not None:
        raise BfError("give --workers or --shard, not both")
    _check_outputs(out=out, plot=plot)
    root = ModelDir.open(model_source(model_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = AnalyzeConfig(
        bits=_bits_list(bits_text),
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
    from bf.evaluate.evaluation import prompt_sets

    prompt_sets(prompts, limit)  # a bad prompt file fails here, not after the model loads
    model = {"path": str(root.root.resolve()), "hash": root.content_hash()}
    check_resumable(out, cfg, model, resume)
    bar = progress_bar(desc="analyze", unit="layer", disable=None, file=sys.stderr)
    if workers > 1:
        from bf.trainer.analyze_workers import run_workers

        def command(k, n, part, resume_part):
            argv = [sys.executable, "-m", "bf.cli", "analyze", "--model", str(root.root), "--bits", bits_text, "--prompts", prompts]
            argv += ["--limit", str(limit), "--seeds", str(seeds), "--cfg", str(cfg_scale), "--scheduler", scheduler]
            argv += ["--steps", str(steps), "--batch-size", str(batch_size), "--device", device, "--shard", f"{k}/{n}", "--out", str(part)]
            argv += ["--qat-steps", str(qat_steps)] + (["--clip", cfg.clip] if cfg.clip else [])
            return argv + (["--layers", layer_regex] if layer_regex else []) + (["--resume"] if resume_part else [])

        def progress_all(done):
            bar.n = done
            bar.refresh()

        result = run_workers(command, workers, out, resume, progress_all, _log)
    else:

        def progress(done, total, name):
            bar.total = total
            bar.n = done
            bar.set_postfix_str(name[-40:])
            bar.refresh()

        loaded = load_model(root.root, scheduler=scheduler, device=device)
        result = run_analysis(loaded.pipe, model, cfg, out, resume, shard=shard_kn, progress=progress, log=_log)
    bar.close()
    n, total = len(result["layers"]), len(result["candidates"])
    _log(f"wrote {out}: {n} of {total} layers analysed" + ("" if n == total else " (finish with --resume, then bf allocate)"))
    if plot is not None:
        from bf.plots import plot_analysis

        plot_analysis(result, plot)
        _log(f"wrote {plot}")


@main.command()
@click.option("--model", "model_dir", default=None, help="Model directory or 'shipped'. Default: the shipped model.")
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
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--bundle", is_flag=True, help="Embed text encoder, VAE and small files in the .bfq.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .bfq to write.")
def train(model_dir, data, images, target_bits, recipe, analysis, uniform_bits, grid, init, no_feature_distill, timesteps, no_stage2,
          stage1_steps, stage2_steps, batch_size, lr, seed, checkpoint_every, checkpoint_minutes, work, log_dir, resume, bf16,
          grad_checkpoint, cuda_graph, device, bundle, out) -> None:  # fmt: skip
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
    Several GPUs: torchrun --nproc_per_node N -m bf.cli train ... (DDP; --batch-size per GPU).
    """
    import os

    import torch

    from bf.models.directory import ModelDir
    from bf.models.shipped import model_source
    from bf.trainer.qat import DEFAULT_FEATURE_WEIGHT, LossConfig
    from bf.trainer.train import TrainConfig
    from bf.trainer.training_run import TrainRequest, train_model

    _check_writable_file(out)  # before hours of training
    model = ModelDir.open(model_source(model_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one process per GPU (or CPU, gloo)
        cuda = device.startswith("cuda")
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        rank = torch.distributed.get_rank()
        if cuda:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
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
    )
    work = work or out.with_name(out.name + ".work")
    from bf.progress import progress_bar

    bars: dict[int, object] = {}

    def progress(stage, step, info):
        if stage not in bars:
            bars[stage] = progress_bar(
                total=info["steps"], initial=step - 1, desc=f"Stage {'I' if stage == 1 else 'II'}", disable=None, file=sys.stderr
            )
        bars[stage].update(1)
        bars[stage].set_postfix(loss=f"{info['loss']:.4g}")

    ckpt = train_model(model, req, work, resume, progress if rank == 0 else (lambda *a: None), _log if rank == 0 else (lambda m: None))
    for b in bars.values():
        b.close()
    if rank != 0:  # the ranks hold identical students; rank 0 writes
        return
    ckpt.save(out)
    from bf.format import summarize

    s = summarize(ckpt, out.stat().st_size)
    _log(f"wrote {out}: {s['avg_bits']:.3f} avg bits (paper's count), {s['stored_bits_per_weight']:.3f} stored bits/weight")
    _log(f"training log: {log_dir or work}/log.csv (TensorBoard: tensorboard --logdir {log_dir or work})")


@main.command()
@click.argument("analysis", type=click.Path(path_type=Path))
@click.option("--target-bits", type=click.FloatRange(1.0, 8.0), default=1.99, show_default=True, help="Average bits (paper's count).")
@click.option("--eta", type=click.FloatRange(0.0, 2.0), default=0.3, show_default=True, help="Sensitivity S = MSE * N^-eta.")
@click.option("--grid", type=click.Choice(["balanced", "plain"]), default="balanced", show_default=True, help="Grid the recipe is for.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The recipe JSON to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the recipe's summary as one JSON object.")
def allocate(analysis: Path, target_bits: float, eta: float, grid: str, out: Path, as_json: bool) -> None:
    """Choose every layer's bit width from a 'bf analyze' result.

    Sensitivity S = MSE * N^-eta per layer and width; each layer takes the smallest
    width in 1..3 under a threshold (else 4), the threshold found by bisection so the
    average hits --target-bits; layers with the largest 3-bit semantic drop (above the
    90th/95th/98th percentile) get +1/+2/+3 bits; conv_in/conv_out stay at 8 bits.
    Prints the histogram and both averages: the paper's count and the real stored bits.
    """
    from bf.atomic import atomic_path
    from bf.report import format_allocation
    from bf.trainer.allocate import allocate as allocate_bits
    from bf.trainer.allocate import load_analysis

    _check_outputs(out=out)
    recipe = allocate_bits(load_analysis(analysis), target_bits, eta=eta, grid=grid, source=str(analysis))
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(recipe, indent=1))
    if as_json:
        click.echo(json.dumps({k: v for k, v in recipe.items() if k != "layers"} | {"out": str(out)}))
    else:
        click.echo(format_allocation(recipe, out))


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["onnx", "onnx-std", "onnx-qdq", "trt", "trt-rtx"]), default="onnx", show_default=True,
              help="onnx: custom dequant ops over the packed codes (TensorRT plugin, ONNX Runtime op library); onnx-std: "
                   "standard decode operators (any ONNX runtime but TensorRT); onnx-qdq: DequantizeLinear over INT4/INT8 "
                   "constants (any ONNX runtime, TensorRT); trt: graphs plus TensorRT engines for this machine's GPU; "
                   "trt-rtx: graphs plus TensorRT for RTX engines, built on any machine for --gpu-arch.")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory (must not exist or be empty).")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="pndm", show_default=True,
              help="Sampler the UNet's time-feature table is built for.")  # fmt: skip
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True, help="Sampling steps the table is built for.")
@click.option("--height", type=click.IntRange(8), default=None, help="Image height [default: the model's native size].")
@click.option("--width", type=click.IntRange(8), default=None, help="Image width [default: the model's native size].")
@click.option("--batch", type=click.IntRange(1), default=2, show_default=True, help="Largest batch of the TensorRT profiles.")
@click.option("--fp16/--fp32", "fp16", default=None,
              help="Engine precision [default: fp16 for trt and trt-rtx]; the ONNX graphs are float32.")  # fmt: skip
@click.option("--weights", type=click.Choice(["plugin", "qdq"]), default=None,
              help="trt, trt-rtx: how the engines hold the quantized weights. plugin: packed codes decoded by the "
                   "LowBitDequant plugin (about half the UNet engine at SD-v1.5 size; needs the plugin built, see "
                   "plugins_trt/README.md); qdq: INT4/INT8 constants, no plugin.  [default: qdq]")  # fmt: skip
@click.option("--gpu-arch", "gpu_arch", default=None, metavar="CC[,CC...]",
              help="trt-rtx: compute capabilities to build for, e.g. 86,89,120 (RTX 30/40/50 series) [default: 86,89,120].")  # fmt: skip
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the graphs in ONNX Runtime against PyTorch; under 40 dB PSNR the export fails.")  # fmt: skip
@click.option("--base-model", type=click.Path(path_type=Path), default=None, help="Base model directory, if it moved.")
@click.option("--plugin", type=click.Path(path_type=Path), default=None, help="TensorRT plugin library (--weights plugin).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(checkpoint, target, out, scheduler, steps, height, width, batch, fp16, weights, gpu_arch, check, base_model, plugin,
               as_json) -> None:  # fmt: skip
    """Export a .bfq as ONNX graphs (text encoder, quantized UNet, VAE decoder), and engines.

    CHECKPOINT may also be an FP model directory: the same graphs without quantization, the
    reference to compare a quantized export with (bf infer runs both). The words shipped-1.99bit
    and shipped name the shipped BitsFusion model and the shipped FP model.

    \b
    Writes text_encoder.onnx, unet.onnx, vae_decoder.onnx, tokenizer/, scheduler/ and
    manifest.json (plus engines/ for trt and trt-rtx). Every quantized weight of unet.onnx is
    one bitsfusion::LowBitDequant node over its packed codes (onnx-std: the same decode in
    standard operators; onnx-qdq: DequantizeLinear), and the UNet takes a step index into a
    time-feature table built for --scheduler and --steps.
    """
    from bf.export.exporter import ExportRequest, export_model
    from bf.models.shipped import model_source
    from bf.progress import progress_bar

    checkpoint = model_source(checkpoint)
    if out.exists() and not out.is_dir():
        raise BfError(f"--out {out} is a file; give a directory that does not exist or is empty")
    _check_writable_parent(out)
    engines = target in ("trt", "trt-rtx")
    precision = ("fp16" if engines else "fp32") if fp16 is None else ("fp16" if fp16 else "fp32")
    from bf.tensorrt_flavors import arch_name

    archs = tuple(arch_name(a) for a in gpu_arch.split(",")) if gpu_arch else ()
    req = ExportRequest(target=target, scheduler=scheduler, steps=steps, height=height, width=width, batch=batch,
                        precision=precision, check=check, plugin=plugin, weights=weights, gpu_archs=archs)  # fmt: skip
    from bf.export.onnx_graphs import GRAPHS

    stages = len(GRAPHS) * (2 if check else 1) + engines  # trace each graph, check each, build the engines
    bar = progress_bar(total=stages, desc="export", disable=None, file=sys.stderr, bar_format="{desc}: {n}/{total} {postfix}")

    def progress(stage: str) -> None:
        bar.set_postfix_str(stage)
        bar.update(1)

    manifest = export_model(checkpoint, out, req, base_model=base_model, log=_log, progress=progress)
    bar.close()
    br = manifest["graphs"]["unet"]["size_breakdown"]
    _log(f"wrote {out} ({target}, {precision})")
    _log("unet.onnx: " + ", ".join(f"{k.replace('_', ' ')} {v / 1e6:.3f} MB" for k, v in br.items()))
    _log(f"packed UNet layers in the .bfq: {manifest['packed_unet_bytes'] / 1e6:.3f} MB")
    if as_json:
        click.echo(json.dumps(manifest, indent=1))


def _shipped_export(scheduler: str = "pndm", steps: int = 50) -> Path:
    """The shipped 1.99-bit model, exported (onnx-std) into the cache once per sampler and step count."""
    from bf.models.shipped import shipped_bfq

    return _cached_bfq_export(shipped_bfq(), "onnx-std", scheduler=scheduler, steps=steps)


# bf infer and bf bench, torch backend
KEEP_DECODED_OPTION = click.option(
    "--keep-decoded", type=click.IntRange(0), default=0, show_default=True, metavar="MB",
    help="torch, streamed weights: keep this many MB of the largest weights decoded instead of decoding them every step "
         "(GPU memory for speed).",
)  # fmt: skip
FUSED_OPTION = click.option(
    "--fused", type=click.Choice(["auto", "on", "off"]), default=None,
    help="torch, streamed weights: run layers on the fused low-bit kernel (Triton), which reads the codes in its matrix tiles "
         "instead of decoding them first (needs Triton). auto: where each layer's first call measures it faster "
         "[default: off].",
)  # fmt: skip


@main.command("infer")
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", required=True, help="What to draw.")
@click.option("--negative-prompt", default="", help="What to steer away from (the unconditional prompt).")
@click.option("--steps", type=int, default=None, help="Sampling steps [default: what the model was exported for].")
@click.option("--cfg", type=click.FloatRange(0), default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=1024, show_default=True,
              help="Seed of the initial noise (NumPy): same image on every backend. Image i of --num-images uses seed + i.")  # fmt: skip
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None,
              help="Sampler [default: the one the model was exported for].")  # fmt: skip
@click.option("--height", type=int, default=None, help="Image height [default: the export's].")
@click.option("--width", type=int, default=None, help="Image width [default: the export's].")
@click.option("--num-images", type=click.IntRange(1, 64), default=1, show_default=True, help="Images per prompt (one batch).")
@click.option("--backend", type=click.Choice(["ort", "trt", "torch"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu). trt: the TensorRT engines of a --target trt export "
                   "(needs bf[trt]). torch: PyTorch on a CUDA GPU, weights decoded by plugins_trt's kernels (needs bf[train] "
                   "and make plugins).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True,
              help="PNG to write (with -1, -2, ... before the suffix for several images).")  # fmt: skip
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="Replay the UNet step from a CUDA graph [default: on for torch, off for trt].")  # fmt: skip
@FUSED_OPTION
@KEEP_DECODED_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the settings, output files and timings per stage as JSON.")
def infer_cmd(model_dir, prompt, negative_prompt, steps, cfg, seed, scheduler, height, width, num_images, backend, cuda_graph, fused,
              keep_decoded, out, as_json) -> None:  # fmt: skip
    """Generate images from an exported model directory (bf export's output) with the lean runtime.

    Without MODEL_DIR: the shipped 1.99-bit BitsFusion model, exported on first use.

    \b
    No torch, diffusers or transformers are imported on the ort backend. The PNG carries the
    prompt, negative prompt, seed, steps, cfg, scheduler and model hash in its metadata.
    """
    from bf.progress import progress_bar
    from bf.runtime.exported import ExportedModel
    from bf.runtime.generation import GenerationRequest, generate
    from bf.runtime.png import write_png

    if not prompt.strip():
        raise BfError("--prompt is empty; say what to draw")
    if steps is not None and steps < 1:  # before the shipped model is exported for it
        raise BfError(f"--steps {steps}: must be at least 1")
    _check_png_out(out)
    _check_gpu_backend(backend)
    model = ExportedModel.open(model_dir if model_dir is not None else _shipped_export(scheduler or "pndm", 50 if steps is None else steps))
    req = GenerationRequest(prompt, negative_prompt, steps, cfg, seed, scheduler, height, width, num_images)
    if warning := model.size_warning(height, width):
        _log(warning)
    # PNDM makes one UNet call more than its steps (51 for 50): the bar counts calls, not steps.
    bar = progress_bar(total=None, desc="sampling", unit="UNet call", disable=None, file=sys.stderr)

    def progress(i: int, n: int) -> None:
        bar.total = n
        bar.update(1)

    runner = _open_backend(backend, model, cuda_graph=cuda_graph, fused=fused, keep_decoded=keep_decoded)
    result = generate(model, runner, req, progress)
    bar.close()
    if result.dropped_tokens:
        _log(f"warning: the prompt is longer than 75 tokens; the last {result.dropped_tokens} were dropped")
    paths = [out] if num_images == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(num_images)]
    for i, (path, image) in enumerate(zip(paths, result.images, strict=True)):
        settings = {**result.settings, "seed": seed + i}  # what reproduces this image alone
        write_png(path, image, {"bf": json.dumps(settings), **{k: str(v) for k, v in settings.items()}})
    _log(f"wrote {', '.join(map(str, paths))}")
    if as_json:
        execution = {"backend": runner.name, "provider": getattr(runner, "provider", None)}  # ort: the execution provider it took
        click.echo(json.dumps({"files": [str(p) for p in paths], "settings": result.settings, "execution": execution,
                               "timings": result.timings}, indent=1))  # fmt: skip


def _check_new_file(out: Path, force: bool) -> None:
    """Before any work: --out is new (or --force) and its directory can be written (made if missing)."""
    if out.exists() and not force and not out.is_dir():
        raise BfError(f"{out} already exists; pass --force to replace it")
    _check_writable_file(out)


def _check_outputs(**outs: Path | None) -> None:
    """Before any work: every output file given (not None, not '-' for stdout) can be written.
    Keywords are option names without dashes (json_out= for --json)."""
    for option, out in outs.items():
        if out is not None and str(out) != "-":
            _check_writable_file(out, "--" + option.removesuffix("_out").replace("_", "-"))


def _check_writable_file(out: Path, option: str = "--out") -> None:
    """``out`` is not a directory, and the nearest existing directory above it can be written."""
    if out.is_dir():
        raise BfError(f"{option} {out} is a directory; give a file name")
    _check_writable_parent(out, option)


def _check_writable_parent(out: Path, option: str = "--out") -> None:
    parent = next(p for p in (out.parent.absolute(), *out.parent.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BfError(f"{option} {out}: {parent} is not a writable directory; choose another {option}")


def _check_gpu_backend(backend: str) -> None:
    """Before any export or load: the GPU backends need a visible CUDA GPU."""
    from bf.runtime.cuda_runtime import gpu_count

    if backend in ("torch", "trt") and gpu_count() == 0:
        raise BfError(f"--backend {backend} runs on a CUDA GPU and none is visible here; use --backend ort")


def _check_png_out(out: Path) -> None:
    """Before any work: bf infer writes PNG files into a directory that exists and can be written."""
    if out.suffix.lower() != ".png":
        raise BfError(f"--out {out}: bf infer writes PNG images; give a .png file name")
    if not out.parent.is_dir():  # unlike the other commands' --out, no directories are made for images
        raise BfError(f"--out {out}: directory {out.parent} does not exist; create it first")
    _check_writable_file(out)


def _cached_export(source: Path, key: str, target: str, **settings) -> Path:
    """``bf export SOURCE`` into the cache once per (source, target, settings)."""
    from bf.cache import cache_root
    from bf.export.exporter import ExportRequest, export_model

    out = cache_root() / "-".join(
        [key, target, *("_".join(v) if isinstance(v, tuple) else str(v) for v in settings.values()), bf.__version__]
    )
    if (out / "manifest.json").is_file():
        return out
    _log(f"exporting {source} ({target}) to {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    export_model(source, out, ExportRequest(target=target, check=False, **settings), log=lambda m: None)
    return out


def _cached_bfq_export(bfq: Path, target: str, **settings) -> Path:
    """A .bfq exported once into the cache, keyed by its content (a retrained file is exported again)."""
    from bf.export.exporter import sha256_file

    return _cached_export(bfq, sha256_file(bfq).removeprefix("sha256:")[:16], target, **settings)


def _bench_target(target: Path | None, backend: str) -> Path:
    from bf.models.shipped import model_source

    if target is None:
        return _shipped_export()
    target = model_source(target)
    if target.is_file():  # a .bfq: exported once into the cache
        return _cached_bfq_export(target, "trt" if backend == "trt" else "onnx-std")
    return target


def _baseline_export(model, backend: str) -> Path:
    """The FP model a quantized export came from, exported with the same sampler and size."""
    from bf.models.base_model import quantized_from
    from bf.models.directory import COMPONENTS

    source = Path(model.manifest.model.source)
    if not source.is_file():
        raise BfError(f"{model.root} was exported from {source}, which is gone; the baseline is its base model (or pass --baseline none)")
    base = quantized_from(source)
    m = model.manifest
    settings = {"scheduler": m.scheduler.name, "steps": m.scheduler.steps, "height": m.image.height, "width": m.image.width}
    key = "fp-" + base.content_hash(COMPONENTS).removeprefix("sha256:")[:16]  # the UNet too: it is what the baseline runs
    target = "onnx-std"
    if backend == "trt":  # the same flavour, precision and target GPUs as the engines it is compared with
        target = m.target if m.target in ("trt", "trt-rtx") else "trt"
        settings["precision"] = m.precision
        if target == "trt-rtx":
            settings["gpu_archs"] = tuple(m.raw.get("export_settings", {}).get("gpu_archs") or ())
    return _cached_export(base.root, key, target, **settings)


def _open_backend(backend: str, model, weights: str | None = None, cuda_graph: bool | None = None, fused: str | None = None,
                  keep_decoded: int = 0):  # fmt: skip
    """``cuda_graph`` None: the backend's default (on for torch, off for trt); ``weights``, ``fused``, ``keep_decoded``: torch only."""
    if backend == "torch":
        from bf.runtime.backend_torch import TorchBackend

        return TorchBackend(model, weights=weights, cuda_graph=cuda_graph is not False, fused=fused, keep_decoded_mb=keep_decoded)
    if backend == "trt":
        from bf.runtime.backend_trt import TrtBackend

        return TrtBackend(model, cuda_graph=bool(cuda_graph))
    from bf.runtime.backend_ort import OrtBackend

    return OrtBackend(model)


@main.command("bench")
@click.argument("target", type=click.Path(path_type=Path), required=False)
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True,
              help="ort: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu). torch: PyTorch on a CUDA GPU, quantized weights decoded "
                   "layer by layer by plugins_trt's kernels. trt: TensorRT engines (a --target trt export).")  # fmt: skip
@click.option("--baseline", type=click.Choice(["fp16", "none"]), default="fp16", show_default=True,
              help="Also run the unquantized base model (torch: FP16 weights; ort: its float32 graphs; trt: its engines) and "
                   "report quantized/baseline ratios.")  # fmt: skip
@click.option("--height", type=int, default=None, help="Image height [default: the export's].")
@click.option("--width", type=int, default=None, help="Image width [default: the export's].")
@click.option("--batch", "batch_text", default="2", show_default=True, help="UNet batch sizes, comma-separated (2: one image with CFG).")
@click.option("--steps", type=int, default=None, help="Sampling steps end to end [default and only choice: the export's table].")
@click.option("--runs", type=click.IntRange(1), default=10, show_default=True, help="Timed runs per stage (the median is reported).")
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True, help="Untimed runs before them.")
@click.option("--no-end-to-end", is_flag=True, help="Skip the full text-to-image run.")
@click.option("--weights", type=click.Choice(["streamed", "decoded"]), default="streamed", show_default=True,
              help="torch: decode each layer just before it runs into a small reused buffer (streamed), or all once at load.")  # fmt: skip
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True, help="torch, trt: replay the UNet step from a CUDA graph.")
@FUSED_OPTION
@KEEP_DECODED_OPTION
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write every figure as JSON here ('-': stdout).")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Draw size and latency bars per component (PNG).")
def bench_cmd(target, backend, baseline, height, width, batch_text, steps, runs, warmup, no_end_to_end, weights, cuda_graph, fused,
              keep_decoded, json_out, plot) -> None:  # fmt: skip
    """Size, latency per stage and GPU memory of an exported model, next to its FP baseline.

    TARGET: a bf export directory, or a .bfq (exported once into the cache; shipped-1.99bit names
    the shipped one). Without it: the
    shipped 1.99-bit BitsFusion model. Reports the deployed artifact sizes, the median time of
    the text encoder, one UNet step per --batch and the VAE decoder, a full generation over the
    export's steps and, on the torch backend, peak GPU memory while the UNet steps.
    """
    import dataclasses

    from bf.progress import progress_bar
    from bf.runtime.bench import BenchRequest, bench_model, environment, format_report, ratios
    from bf.runtime.exported import ExportedModel

    try:
        batches = tuple(sorted({int(b) for b in batch_text.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(f"{batch_text!r}: expected comma-separated batch sizes, e.g. 1,2", param_hint="--batch") from None
    if not batches or min(batches) < 1:
        raise click.BadParameter(f"{batch_text!r}: batch sizes must be at least 1", param_hint="--batch")
    _check_outputs(json_out=json_out, plot=plot)
    _check_gpu_backend(backend)
    model = ExportedModel.open(_bench_target(target, backend))
    if steps is not None:
        model.check_sampler(model.manifest.scheduler.name, steps)
    req = BenchRequest(batches=batches, height=height, width=width, runs=runs, warmup=warmup, end_to_end=not no_end_to_end)
    quantized = model.manifest.model.quantized
    if baseline == "fp16" and not quantized:
        _log(f"{model.root} is an FP export: it is its own baseline")
        baseline = "none"
    options = {"weights": weights if quantized else "fp", "cuda_graph": cuda_graph, "fused": fused, "keep_decoded": keep_decoded}
    bar = progress_bar(total=None, desc="bench", disable=None, file=sys.stderr, bar_format="{desc}: {postfix}")

    def run(label: str, model, **options) -> dict:
        runner = _open_backend(backend, model, **options)
        result = bench_model(model, runner, req, progress=lambda what: bar.set_postfix_str(f"{label}: {what}"))
        if backend == "torch":
            result["weights"] = runner.weights
            result["device"] = runner.device_name
            result["fused"], result["fused_layers"] = runner.fused, runner.fused_layers
        del runner
        return result

    result = {"backend": backend, "environment": environment(backend), "settings": {**dataclasses.asdict(req), "baseline": baseline}}
    result["quantized"] = run("quantized", model, **options)
    result["baseline"] = None
    if baseline == "fp16":
        if backend == "torch":
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()  # the peak of the baseline must not see the quantized model's blocks
            result["baseline"] = run("baseline", model, **{**options, "weights": "fp"})
        else:
            result["baseline"] = run("baseline", ExportedModel.open(_baseline_export(model, backend)), **options)
        result["ratios"] = ratios(result["quantized"], result["baseline"])
    bar.close()
    result["device"] = result["quantized"].get("device") or f"cpu ({os.cpu_count()} cores)"
    click.echo(format_report(result), err=json_out == Path("-"))
    if json_out is not None:
        text = json.dumps(result, indent=1)
        if json_out == Path("-"):
            click.echo(text)
        else:
            from bf.atomic import atomic_path

            with atomic_path(json_out) as tmp:
                tmp.write_text(text)
            _log(f"wrote {json_out}")
    if plot is not None:
        from bf.plots import plot_bench

        plot_bench(result, plot)
        _log(f"wrote {plot}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("--layers/--no-layers", default=False, help="Also print the per-layer table.")
@click.option("--no-verify", is_flag=True, help="Skip verification: the header and tensor SHA-256 checks and the packed-code checks.")
def inspect(checkpoint: Path, as_json: bool, layers: bool, no_verify: bool) -> None:
    """Per-layer table and totals of a .bfq: bits, levels, stored size, ratio to FP16.

    avg_bits is the paper's count (log2 of the number of levels per weight, plus 16
    bits per cached time feature for a 50-step table, over all conv/linear weights);
    stored_bits_per_weight is what the disk holds (packed codes and scales). The
    time-embedding layers, kept for training and replaced by a table at export, are
    not counted in unet_bytes. CHECKPOINT shipped-1.99bit: the shipped BitsFusion model.
    """
    from bf.format import Checkpoint, summarize
    from bf.models.shipped import model_source
    from bf.report import format_summary

    checkpoint = model_source(checkpoint)
    ckpt = Checkpoint.load(checkpoint, verify=not no_verify)
    s = summarize(ckpt, checkpoint.stat().st_size)
    if as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        click.echo(format_summary(s, checkpoint, show_layers=layers))


def _floats(text: str) -> tuple[float, ...]:
    """--cfg of bf eval: guidance scales, comma-separated, each at least 0."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint="--cfg") from None
    if not values or min(values) < 0 or not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{text!r}: give one or more finite guidance scales of at least 0", param_hint="--cfg")
    return values


@main.command("eval")
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
    help="'shapes-test' (single, two, heldout splits) or a file, one prompt per line.",
)
@click.option("--cfg", "cfgs", default="3.5,5.5,7.5,9.5", show_default=True, help="Classifier-free guidance scales.")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True, help="Images per prompt.")
@click.option("--seed", type=int, default=1024, show_default=True, help="Seed of the first image of every prompt.")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="pndm", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Use only the first N prompts of each split.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--clip", "clip_dir", type=click.Path(path_type=Path), help="Local CLIP model directory: adds CLIP score.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help='Write {"results": [...]} here.')
@click.option(
    "--grid", "grid_out", type=click.Path(path_type=Path), help="Write an image grid (prompts down, models and CFG scales across)."
)
def eval_cmd(
    models, reference, base_model, prompts, cfgs, seeds, seed, scheduler, steps, limit, batch_size, device, clip_dir, json_out, grid_out
):
    """Prompt faithfulness and fidelity of generated images.

    For shapes prompts an object detector (checked on rendered ground truth) finds the
    objects and checks count, color, shape, size, position and relation against the
    prompt: accuracy per attribute and overall. With --reference: pixel MSE, PSNR
    (null in JSON when the images are identical) and latent MSE against the
    reference's images for the same seeds. A .bfq is evaluated through the same
    diffusers pipeline with its dequantized UNet.
    """
    import dataclasses

    import torch

    from bf.evaluate.evaluation import EvalConfig, evaluate, prompt_sets
    from bf.models.diffusers_pipeline import load_model
    from bf.models.shipped import model_source
    from bf.progress import progress_bar
    from bf.report import format_eval_table, save_eval_grid

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = EvalConfig(prompts=prompts, cfgs=_floats(cfgs), seeds=seeds, seed=seed, steps=steps, batch_size=batch_size, limit=limit)
    _check_outputs(json_out=json_out, grid_out=grid_out)
    sets = prompt_sets(prompts, limit)  # fail on a bad prompt file before loading models
    sources = [model_source(m) for m in models] or [model_source(None)]
    loaded = [load_model(s, scheduler, device, base_model, log=_log) for s in sources]
    tok = loaded[0].pipe.tokenizer
    long = [p for ps in sets for p in ps.prompts if len(tok(p).input_ids) > tok.model_max_length]
    if long:
        _log(f"warning: {len(long)} prompt(s) longer than {tok.model_max_length - 2} tokens are cut there "
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
        ref = dataclasses.replace(same[0]) if same else load_model(ref_source, scheduler, device, base_model, log=_log)
        ref.label = f"reference:{ref.label}"
    clip = None
    if clip_dir is not None:
        from bf.evaluate.clip_score import ClipScorer

        clip = ClipScorer(clip_dir, device)
    pipes = {id(m.pipe) for m in [*loaded, *([ref] if ref is not None else [])]}
    total = sum(len(s.prompts) for s in sets) * seeds * len(cfg.cfgs) * len(pipes)
    with progress_bar(total=total, desc="generate", unit="img", disable=None, file=sys.stderr) as bar:
        results, generated = evaluate(loaded, ref, cfg, clip, progress=bar.update)
    click.echo(format_eval_table(results))
    if json_out is not None:
        from bf.atomic import atomic_path

        payload = {
            "results": [{**r, **({"psnr": None} if r.get("psnr") == float("inf") else {})} for r in results],
            "config": {
                "prompts": prompts,
                "cfg": list(cfg.cfgs),
                "seeds": seeds,
                "seed": seed,
                "scheduler": scheduler,
                "steps": steps,
                "models": [str(s) for s in sources],
                "reference": str(reference) if reference else None,
                "device": device,
            },
        }
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))
        _log(f"wrote {json_out}")
    if grid_out is not None:
        save_eval_grid(grid_out, sets, generated, loaded, ref, cfg)
        _log(f"wrote {grid_out}")


if __name__ == "__main__":
    main()
