"""The scripts of benchmarks/ and tools/ (and the test files the docs cite): every one the docs and results/ name exists,
and each script loads and answers --help."""

import importlib.util
import json
import re
import sys

import pytest

from tests.conftest import REPO

SCRIPT = re.compile(r"\b((?:benchmarks|tools|tests)/[\w/.-]+?\.(?:py|sh))\b")
DOCS = ["README.md", "BENCHMARKS.md", "docs", "plugins_trt/README.md", "bf/assets/README.md"]
PYTHON_SCRIPTS = sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "tools").glob("*.py")])


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def named_scripts() -> dict[str, set[str]]:
    """Script path -> the files (docs, results/*.json, the scripts themselves) that name it."""
    texts = {}
    for rel in DOCS:
        path = REPO / rel
        for f in [path] if path.is_file() else sorted(path.rglob("*.md")):
            texts[f.relative_to(REPO).as_posix()] = f.read_text()
    for f in sorted((REPO / "results").glob("*.json")):
        texts[f"results/{f.name}"] = "\n".join(_strings(json.loads(f.read_text())))
    for f in sorted([*(REPO / "benchmarks").iterdir(), *(REPO / "tools").iterdir()]):
        if f.suffix in (".py", ".sh"):
            texts[f.relative_to(REPO).as_posix()] = f.read_text()
    found: dict[str, set[str]] = {}
    for where, text in texts.items():
        for script in SCRIPT.findall(text):
            found.setdefault(script, set()).add(where)
    return found


def test_every_named_script_exists():
    found = named_scripts()
    assert "benchmarks/sd15_unet_step.py" in found and "tests/format/test_packing.py" in found  # the pattern finds what it should
    missing = {script: sorted(where) for script, where in found.items() if not (REPO / script).is_file()}
    assert missing == {}


def test_results_name_the_command_that_made_them():
    """A result JSON's command names a script by its path in this repository (or is a bf command)."""
    for f in sorted((REPO / "results").glob("*.json")):
        command = json.loads(f.read_text()).get("command")
        if isinstance(command, str) and not command.startswith("bf "):
            assert SCRIPT.search(command), f"{f.name}: {command[:80]}"


@pytest.mark.parametrize("path", PYTHON_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_loads_and_answers_help(path, monkeypatch, capsys):
    """Imported as ``python PATH`` would (its folder first on sys.path), then ``main`` with --help."""
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])  # what the script puts on it stays here
    name = f"_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        return  # a module the others import (tools/sd15_mix.py)
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _step_timeline():
    spec = importlib.util.spec_from_file_location("_step_timeline", REPO / "benchmarks" / "sd15_step_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_step_timeline_splits_a_span_into_the_chains_kernels_launch_gaps_and_waits():
    """sd15_step_timeline.split on a made-up step that decodes ahead: the inputs' copies before the step are left out, a
    decode beside the chain is not the chain's, a gap under 3 us is a launch gap, and a wait that ends within 4 us of a
    decode's end waited on it."""
    module = _step_timeline()
    kernels = [
        [0.0, 1.0, 7, "Memcpy DtoD (Device -> Device)"],  # the input's copy, then the graph's launch
        [500.0, 10.0, 7, "triton_poi_fused_add_0"],
        [505.0, 15.0, 9, "void bf::(anonymous namespace)::decode_batch_kernel<__half, 4>"],  # ends at 520
        [510.5, 5.0, 7, "nvjet_sm90_hsh_64x8"],  # 0.5 us after the first: a launch gap
        [522.0, 4.0, 7, "sm90_xmma_fprop_implicit_gemm"],  # 6.5 us: a wait, 2 us after the decode's end
        [530.0, 2.0, 7, "triton_red_fused_native_group_norm_1"],  # 4 us: a wait on nothing
    ]
    s = module.split("lowbit_compiled_cl_ahead2_graphed", kernels)
    assert s["span_ms"] == pytest.approx(0.032) and s["chain_kernels"] == 4 and s["side_decodes"] == 1
    assert s["chain_busy_ms"] == pytest.approx(0.021) and s["side_decode_ms"] == pytest.approx(0.015)
    assert s["chain_busy_by_category_ms"] == pytest.approx({"fused (triton)": 0.012, "gemm": 0.005, "conv": 0.004})
    assert (s["launch_gaps_ms"], s["waits_ms"], s["waits_on_a_decode_ms"]) == pytest.approx((0.0005, 0.0105, 0.0065))
    # cuDNN's workspace kernel beside a convolution, its name cut where the timeline cuts it, counts as the convolution's
    assert module.kernel_category("void cask_plugin__5x_cudnn::xmma__5x_cudnn::init_device_work") == "conv"
    in_stream = module.split("lowbit_compiled_cl_graphed", kernels)  # the same decode in the step's own stream
    assert in_stream["chain_kernels"] == 5 and in_stream["side_decode_ms"] == 0 and in_stream["waits_on_a_decode_ms"] == 0


def test_the_step_timeline_pairs_each_fused_layer_with_the_fp16_kernel_of_the_same_layer():
    """sd15_step_timeline.fused_layers on two made-up steps: layer kernels pair up in order, each with its helpers
    counted in (cuDNN's workspace kernel with the convolution after it, its padding kernels with the convolution
    beside them, the fused kernel's split-K sum with the kernel before it); other kernels and decodes are not layers;
    steps with unequal layer counts do not pair."""
    module = _step_timeline()
    fp16 = [
        [0.0, 1.0, 7, "Memcpy DtoD (Device -> Device)"],
        [8.0, 1.0, 7, "void nhwcAddPaddingKernel<__half, __half, float, true>"],  # the input's padding: the next layer's
        [10.0, 3.0, 7, "void cask_plugin__5x_cudnn::xmma__5x_cudnn::init_device_workspace_kernel"],  # the next layer's
        [14.0, 20.0, 7, "sm90_xmma_fprop_implicit_gemm_f16f16"],
        [35.0, 5.0, 7, "triton_per_fused_native_group_norm_0"],
        [41.0, 6.0, 7, "nvjet_sm90_hsh_80x64"],
        [48.0, 30.0, 7, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"],
        [79.0, 3.0, 7, "void cask_plugin__5x_cudnn::xmma__5x_cudnn::init_device_workspace_kernel"],
        [83.0, 40.0, 7, "sm90_xmma_fprop_implicit_gemm_f16f16"],
        [124.0, 2.0, 7, "void nhwcAddPaddingKernel<__half, __half, float, true>"],  # the output's: the layer before's
        [127.0, 4.0, 7, "triton_poi_fused_add_1"],
    ]
    lowbit = [
        [0.0, 1.0, 7, "Memcpy DtoD (Device -> Device)"],
        [10.0, 4.0, 7, "void bf::(anonymous namespace)::decode_batch_kernel<__half, 1>"],
        [15.0, 16.0, 7, "_wgmma_lowbit_kernel"],
        [32.0, 3.0, 7, "_split_sum_kernel"],
        [36.0, 5.0, 7, "triton_per_fused_native_group_norm_0"],
        [42.0, 6.5, 7, "nvjet_sm90_hsh_80x64"],
        [49.0, 30.0, 7, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"],
        [80.0, 46.0, 7, "_lowbit_conv_kernel"],
    ]
    assert module.layer_kernels(fp16) == [("sm90_xmma_fprop_implicit_gemm_f16f16", 24.0), ("nvjet_sm90_hsh_80x64", 6.0),
                                          ("sm90_xmma_fprop_implicit_gemm_f16f16", 45.0)]  # fmt: skip
    paired = module.fused_layers(fp16, lowbit)
    assert (paired["layers"], paired["fused"], paired["slower"]) == (3, 2, 1)
    assert [(r["layer"], r["fp16_us"], r["fused_us"]) for r in paired["rows"]] == [(0, 24.0, 19.0), (2, 45.0, 46.0)]
    assert paired["diff_us"] == pytest.approx(-4.0) and paired["fused_us"] == pytest.approx(65.0)
    assert module.fused_layers(fp16, lowbit[:-1]) is None  # a layer short: no pairing
