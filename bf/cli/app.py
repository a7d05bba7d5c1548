"""The ``bf`` command group: every command, and how errors reach the user (one line on stderr)."""

from __future__ import annotations

import importlib
import os
import sys

import click

import bf
from bf.errors import BfError


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


# One module per command; click lists them by name in the help.
COMMAND_MODULES = ("random_model_cmd", "quantize_cmd", "analyze_cmd", "allocate_cmd", "train_cmd", "inspect_cmd", "export_cmd",
                   "infer_cmd", "bench_cmd", "eval_cmd", "to_diffusers_cmd")  # fmt: skip
_EXTRAS = {"torch": "train", "diffusers": "train", "transformers": "train", "matplotlib": "plot", "onnx": "export", "onnxruntime": "export"}


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


for _module in COMMAND_MODULES:
    main.add_command(importlib.import_module(f"bf.cli.{_module}").command)
