"""Options shared by several commands, declared once."""

from __future__ import annotations

import click

MODEL_OPTION = click.option("--model", "model_dir", default=None, help="Model directory or 'shipped'. Default: the shipped model.")
DEVICE_OPTION = click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")

# bf infer and bf bench, torch backend
KEEP_DECODED_OPTION = click.option(
    "--keep-decoded", type=click.IntRange(0), default=0, show_default=True, metavar="MB",
    help="torch, streamed weights: keep this many MB of the largest weights decoded instead of decoding them every step "
         "(GPU memory for speed); with --compile and --fused auto or on (where they apply: Triton, float16), of the layers "
         "the fused kernels do not take, the smallest decode kernels whole (a block's layers of one bit width), chosen at the "
         "first step (such decodes are mostly launches).",
)  # fmt: skip
FUSED_OPTION = click.option(
    "--fused", type=click.Choice(["auto", "on", "off"]), default=None,
    help="torch, streamed weights: run layers on the fused low-bit kernel (Triton; on Hopper GPUs also a TMA kernel), which "
         "reads the codes in its matrix tiles instead of decoding them first (needs Triton, float16). auto: where it measures "
         "faster (each layer's first call; with --compile, every class of layer timed at the first step's shape, before it "
         "compiles, against cuDNN/cuBLAS plus the weight's share of the step's decode, and kept for later shapes: 0.5-2 "
         "minutes the first time on an H200, each tile compiling); on: every layer it can run [default: off].",
)  # fmt: skip


RUNTIME_LORA_OPTION = click.option(
    "--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
    help="torch: a LoRA (diffusers, peft or kohya format) run as a low-rank branch beside its UNet layers, the low-bit "
         "layers left packed; repeatable; SCALE defaults to 1. The ort and trt backends run the exported graph: put a LoRA "
         "into it with bf export --lora.",
)  # fmt: skip
COMPILE_OPTION = click.option(
    "--compile", "compile_step", is_flag=True,
    help="torch: compile the UNet step with torch.compile (inductor) and replay it from a CUDA graph (unless --no-cuda-graph); "
         "streamed weights are decoded inside it, or read by the fused kernel with --fused. The first step of each shape "
         "compiles (about a minute for SD-v1.5; cached for later runs).",
)  # fmt: skip


LOW_MEMORY_OPTION = click.option(
    "--low-memory", is_flag=True,
    help="torch: less GPU memory: the text encoders and the VAE wait on the CPU and visit the GPU one at a time (in the "
         "first generation before the UNet is built), the UNet's CUDA graph and activations are let go while they visit, and "
         "the VAE decodes one image at a time in 512-pixel tiles (seams blended, as diffusers' enable_tiling); a VAE that "
         "overflows in float16 (SDXL's) decodes in bfloat16 instead of float32 where the GPU has it. Costs their "
         "copies to and from the GPU and a new capture of the UNet's graph on every generation.",
)  # fmt: skip


def backend_options(weights: str | None, cuda_graph: bool | None, fused: str | None, keep_decoded_mb: int, compile_step: bool = False,
                    loras: tuple = (), low_memory: bool = False):  # fmt: skip
    """The runtime's BackendOptions from the command line's (--keep-decoded is in MB there, bytes from here on;
    ``loras``: parsed --lora arguments)."""
    from bf.runtime.backend_options import BackendOptions

    return BackendOptions(weights=weights, cuda_graph=cuda_graph, fused=fused, keep_decoded_bytes=keep_decoded_mb * 2**20,
                          compile=compile_step, loras=tuple((str(p), s) for p, s in loras), low_memory=low_memory)  # fmt: skip
