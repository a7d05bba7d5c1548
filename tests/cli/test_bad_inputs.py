"""Every command over a table of bad inputs: exit code, one `error:` line, no traceback, nothing written.

Run in-process (``run_bf``) from a directory holding the inputs; the directory and bf's cache are
compared before and after each case.
"""

import os
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tests.conftest import run_bf

USAGE = 2  # click's exit code for a bad option value or a missing option; bf's own errors exit 1

CASES = [
    # random-model
    (["random-model", "--arch", "sd99", "--out", "m"], USAGE, "Invalid value for '--arch'"),
    (["random-model", "--arch", "sd15-tiny", "--out", "exists.bfq"], 1, "exists.bfq already exists; pass --force"),
    # quantize
    (["quantize", "--model", "nosuch", "--bits", "2", "--out", "q.bfq"], 1, "nosuch"),
    (["quantize", "--bits", "2", "--out", "exists.bfq"], 1, "already exists; pass --force"),
    (["quantize", "--bits", "9", "--out", "q.bfq"], USAGE, "Invalid value for '--bits'"),
    (["quantize", "--recipe", "notjson.json", "--out", "q.bfq"], 1, "notjson.json"),
    (["quantize", "--bits", "2", "--out", "afile/q.bfq"], 1, "is not a writable directory"),
    # inspect
    (["inspect", "nosuch.bfq"], 1, "nosuch.bfq"),
    (["inspect", "corrupt.bfq"], 1, "not a readable .bfq"),
    (["inspect", "emptydir"], 1, "emptydir"),
    # analyze
    (["analyze", "--layers", "[", "--out", "a.json"], 1, "not a regular expression"),
    (["analyze", "--bits", "0", "--out", "a.json"], USAGE, "Invalid value for --bits: '0': widths must be in 1..8"),
    (["analyze", "--out", "afile/a.json"], 1, "is not a writable directory"),
    (["analyze", "--prompts", "latin1.txt", "--out", "a.json"], 1, "not a UTF-8 text file"),
    # allocate
    (["allocate", "nosuch.json", "--out", "r.json"], 1, "nosuch.json"),
    (["allocate", "notjson.json", "--out", "r.json"], 1, "notjson.json"),
    (["allocate", "notjson.json", "--target-bits", "0.5", "--out", "r.json"], USAGE, "--target-bits"),
    # train
    (["train", "--resume", "--out", "t.bfq"], 1, "holds no training state"),
    (["train", "--recipe", "nosuch.json", "--out", "t.bfq"], 1, "nosuch.json"),
    (["train", "--data", "nosuchdir", "--uniform-bits", "2", "--out", "t.bfq"], 1, "nosuchdir"),
    (["train", "--out", "emptydir"], 1, "is a directory"),
    (["train", "--cuda-graph", "--uniform-bits", "2", "--images", "2", "--device", "cpu", "--out", "t.bfq"], 1, "--cuda-graph needs"),
    (["train", "--lr", "0", "--out", "t.bfq"], USAGE, "--lr"),
    (["train", "--fp-control", "--uniform-bits", "2", "--out", "ctl"], 1, "which has no recipe: drop --uniform-bits"),
    (["train", "--fp-control", "--no-stage2", "--out", "ctl"], 1, "--fp-control without Stage II is the FP model itself"),
    (["train", "--fp-control", "--init", "minmax", "--out", "ctl"], 1, "which --init would not change: drop them"),
    (["train", "--fp-control", "--out", "fulldir"], 1, "--out fulldir already exists; give a new directory for the model"),
    # export
    (["export", "nosuch.bfq", "--out", "e"], 1, "nosuch.bfq"),
    (["export", "corrupt.bfq", "--out", "e"], 1, "not a readable .bfq"),
    (["export", "shipped-1.99bit", "--out", "fulldir"], 1, "is not empty"),
    (["export", "shipped-1.99bit", "--out", "exists.bfq"], 1, "is a file"),
    (
        ["export", "shipped-1.99bit", "--height", "100", "--out", "e"],
        1,
        "--height 100: this UNet halves its latents 8x, so image sizes must be multiples of 64",
    ),
    (["export", "shipped-1.99bit", "--target", "trt-rtx", "--gpu-arch", "99", "--out", "e"], 1, "--gpu-arch 99: "),
    # infer
    (["infer", "nosuchdir", "--prompt", "x"], 1, "nosuchdir"),
    (["infer", "emptydir", "--prompt", "x"], 1, "emptydir"),
    (["infer", "--seed", "-1", "--prompt", "x"], USAGE, "Invalid value for '--seed'"),
    (["infer", "--cfg", "-3", "--prompt", "x"], USAGE, "Invalid value for '--cfg'"),
    (["infer", "--prompt", "x", "--out", "x.jpg"], 1, "writes PNG images"),
    (["infer", "--prompt", "x", "--out", "nosuchdir/x.png"], 1, "does not exist"),
    (["infer", "--prompt", "x", "--steps", "0"], 1, "--steps 0"),
    (
        ["infer", "--prompt", "x", "--height", "100"],
        1,
        "--height 100 --width 128: both must be positive multiples of 64 (nearest: --height 128",
    ),
    (["infer", "--prompt", "  "], 1, "--prompt is empty"),
    (["infer", "--prompt", "x", "--backend", "trt"], 1, "none is visible here"),
    (["infer", "--prompt", "x", "--compile"], 1, "--compile applies to --backend torch, not ort"),
    (["infer", "--prompt", "x", "--low-memory"], 1, "--low-memory applies to --backend torch, not ort"),
    (["infer", "--prompt", "x", "--fused", "auto"], 1, "--fused auto applies to --backend torch, not ort"),
    (["infer", "--prompt", "x", "--lora", "style.safetensors"], 1, "--lora runs on --backend torch; the ort backend runs the exported"),
    (["infer", "--prompt", "x", "--backend", "torch", "--lora", "nosuch.safetensors:0.5"], 1, "--lora nosuch.safetensors: no such file"),
    (["infer", "--prompt", "x", "--backend", "torch", "--lora", "nosuch.safetensors:inf"], 1, "the scale must be a finite number"),
    (["eval", "--images-per-split", "-1"], USAGE, "Invalid value for '--images-per-split'"),
    # bench
    (["bench", "--batch", "0"], USAGE, "batch sizes must be at least 1"),
    (["bench", "nosuch"], 1, "nosuch"),
    (["bench", "--backend", "torch"], 1, "none is visible here"),
    (["bench", "--json", "afile/b.json"], 1, "--json afile/b.json: "),
    (["bench", "--compile"], 1, "--compile applies to --backend torch, not ort"),
    (["bench", "--low-memory"], 1, "--low-memory applies to --backend torch, not ort"),
    (["bench", "--backend", "torch", "--fp16-configs", "graph,fast"], 1, "--fp16-configs 'fast': choose from eager, graph, graph-nchw"),
    (["bench", "--backend", "torch", "--fp16-configs", ","], 1, "--fp16-configs is empty"),
    # eval
    (["eval", "--prompts", "latin1.txt"], 1, "not a UTF-8 text file"),
    (["eval", "--model", "nosuch"], 1, "nosuch"),
    (["eval", "--cfg", "abc"], USAGE, "Invalid value for --cfg: expected comma-separated numbers"),
    (["eval", "--cfg", "7.5,-1"], USAGE, "at least 0"),
    (["eval", "--json", "afile/e.json"], 1, "--json afile/e.json: "),
    (["eval", "--grid", "emptydir"], 1, "--grid emptydir is a directory"),
]


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "exists.bfq").write_bytes(b"x")
    (d / "corrupt.bfq").write_bytes(os.urandom(300))
    (d / "notjson.json").write_text("{not json")
    (d / "latin1.txt").write_bytes("a red circle caf\xe9\n".encode("latin-1"))
    (d / "afile").write_text("a file where a directory is expected")
    (d / "emptydir").mkdir()
    (d / "fulldir").mkdir()
    (d / "fulldir" / "keep.txt").write_text("mine")
    return d


@pytest.mark.parametrize(("args", "code", "message"), CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_gets_one_error_line_and_leaves_nothing(args, code, message, inputs, tmp_path):
    if "none is visible here" in message:
        from bf.runtime.cuda_runtime import gpu_count

        if gpu_count():
            pytest.skip("a GPU is visible")
    cache = tmp_path / "cache"
    cache.mkdir()
    before, cache_before = _tree(inputs), _tree(cache)
    result = run_bf(*args, cwd=inputs, cache=cache)  # an uncaught exception comes back as a traceback in stderr
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert lines == errors, result.stderr  # the error alone: every check comes before any work that prints
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert _tree(inputs) == before, "written or changed in the working directory"
    assert _tree(cache) == cache_before, "written into bf's cache"
