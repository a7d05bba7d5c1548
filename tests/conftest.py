import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random sd15-tiny model directory, built once per test session."""
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model

    out = tmp_path_factory.mktemp("models") / "tiny"
    write_random_model(ARCHITECTURES["sd15-tiny"], out, seed=0, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """A random sdxl-tiny model directory, built once per test session."""
    from bf.models.architectures import ARCHITECTURES
    from bf.models.random_model import write_random_model

    out = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    write_random_model(ARCHITECTURES["sdxl-tiny"], out, seed=0, log=lambda m: None)
    return out


def run_bf(*args: str, cwd: Path | None = None, cache: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in this process, as a user would from a shell: exit code, stdout and stderr.

    In-process because starting Python and importing torch costs seconds per call; an exception that
    escapes the CLI is written to stderr as the traceback a user would see. Tests of what only a
    process shows (signals, import isolation) start one themselves. ``cache``: bf's cache
    directory for this call (what $BF_CACHE sets for a process)."""
    import traceback
    import warnings

    from click.testing import CliRunner

    from bf import cli

    old, old_cache = Path.cwd(), os.environ.get("BF_CACHE")
    try:
        if cwd is not None:
            os.chdir(cwd)
        if cache is not None:
            os.environ["BF_CACHE"] = str(cache)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = CliRunner().invoke(cli.main, [str(a) for a in args], prog_name="bf")
    finally:
        os.chdir(old)
        if cache is not None:
            os.environ.pop("BF_CACHE") if old_cache is None else os.environ.update(BF_CACHE=old_cache)
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["bf", *map(str, args)], r.exit_code, r.stdout, stderr)


ORT_HEADERS = REPO / "build" / "third_party" / "onnxruntime" / "usr" / "include" / "onnxruntime"


@pytest.fixture(scope="session")
def native_build(tmp_path_factory) -> Path:
    """plugins_trt built from the current sources (decode library, ONNX Runtime op), once per session.

    The CUDA kernels (sm_90) are compiled only where a GPU can run them: the GPU tests that use them
    run on such a machine, and without one nvcc would take most of this build. The ONNX Runtime op
    needs `make ort-headers` (which `make test` runs). The TensorRT plugin is not built here: CI has
    no TensorRT headers.
    """
    import shutil

    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("needs cmake and a C++ compiler")
    build = tmp_path_factory.mktemp("plugins_build")
    try:
        import torch

        cuda = "ON" if torch.cuda.is_available() else "OFF"
    except ImportError:
        cuda = "OFF"
    cfg = ["cmake", "-S", str(REPO / "plugins_trt"), "-B", str(build), "-DBF_CUDA_ARCHITECTURES=90", f"-DBF_WITH_CUDA={cuda}"]
    if ORT_HEADERS.is_dir():
        cfg.append(f"-DORT_INCLUDE_DIR={ORT_HEADERS}")
    for cmd in (cfg, ["cmake", "--build", str(build), "-j2", "--target", "bf_decode", *(["bf_ort_op"] if ORT_HEADERS.is_dir() else [])]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build


@pytest.fixture(scope="session")
def ort_op_library(native_build) -> Path:
    lib = native_build / "libbf_ort_op.so"
    if not lib.is_file():
        pytest.fail("libbf_ort_op.so was not built: run 'make ort-headers' first (make test does)")
    return lib


@pytest.fixture(scope="session")
def diffusers_dir(tmp_path_factory) -> Path:
    """The shipped 1.99-bit model written by bf to-diffusers (read only)."""
    out = tmp_path_factory.mktemp("to_diffusers") / "shipped"
    r = run_bf("to-diffusers", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def random_lora_file(path: Path, unet, rank: int = 4, seed: int = 0, targets=("to_q", "to_v", "conv1")) -> Path:
    """A random LoRA in diffusers' format (peft's lora_A / lora_B under 'unet.') for ``unet``'s layers named ``targets``
    (the last part of their name), shaped from each layer's ``weight``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in unet.named_modules():
        if name.rpartition(".")[2] in targets and isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
            w = m.weight
            down = (rank, w.shape[1], *w.shape[2:])
            up = (w.shape[0], rank, *((1, 1) if w.dim() == 4 else ()))
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(down, generator=g) * 0.1
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(up, generator=g) * 0.1
    save_file(tensors, str(path))
    return path


def conv_linear_stack(widths: tuple[int, int, int, int], grids: tuple, scale: float):
    """A stack a (3x3 conv) -> SiLU -> b (1x1 conv, no bias) -> mean over pixels -> fc (linear) with channels
    ``widths`` = (in, a's out, b's out, fc's out), each layer quantized on its grid of ``grids`` (a, b, fc) to random
    levels with scales up to ``scale``: the stack on the decoded weights, and its QuantizedLayers by name."""
    import numpy as np
    import torch
    from torch import nn

    from bf.format import QuantizedLayer

    torch.manual_seed(0)
    cin, mid, out, fc_out = widths

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(cin, mid, 3, padding=1), nn.Conv2d(mid, out, 1, bias=False)
            self.fc = nn.Linear(out, fc_out)

        def forward(self, x):
            x = torch.nn.functional.silu(self.a(x))
            x = self.b(x) * 0.5 + 1.0
            return self.fc(x.mean((2, 3)))

    rng = np.random.default_rng(0)
    layers = {}
    for name, grid in zip(("a", "b", "fc"), grids, strict=True):
        shape = tuple(getattr(Net(), name).weight.shape)
        layers[name] = QuantizedLayer.from_levels(name, rng.integers(grid.qmin, grid.qmax + 1, shape), rng.random(shape[0]) * scale, grid)
    decoded = Net()
    for name, layer in layers.items():
        getattr(decoded, name).weight.data = torch.from_numpy(layer.dequantize())
    return decoded, layers


def forced_fused(decoded, layers: dict, names) -> dict:
    """Every named layer of ``decoded`` (a module whose weights are ``layers``' QuantizedLayers decoded) fused, as
    bf.runtime.compiled_fused.choose_fused answers, with the codes the layers' levels make (no GPU to read them back
    from) and a placeholder tile (the CPU runs the op's reference path)."""
    import numpy as np
    import torch

    from bf.runtime.fused_layout import fused_weight

    chosen = {}
    for name in names:
        layer = layers[name]
        codes = torch.from_numpy(layer.levels().astype(np.int64)) - layer.grid.qmin  # code 0 is the lowest level
        if codes.dim() == 4:
            codes = codes.permute(0, 2, 3, 1)  # (kh, kw, in) rows: the fused layout's K order
        scale = torch.from_numpy(np.asarray(layer.scale, dtype=np.float32))
        chosen[name] = (fused_weight(codes.to(torch.uint8), scale, decoded.get_submodule(name), layer.grid.levels), ("a tile",))
    return chosen
