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


def _load(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_rounds_cancel_a_gpu_that_drifts_and_give_the_ratio_an_interval():
    """interleaved_timing on a made-up GPU that slows 0.1% with every timing, over 6% in the run: timed each in turn, B
    looks 3% slower than its true 4% over A; timed in interleaved rounds, the paired median is 1.04 within 0.1% and its
    interval holds it. A baseline's ratio to itself is exactly 1; unpaired rounds are refused."""
    module = _load("_interleaved_timing", REPO / "benchmarks" / "interleaved_timing.py")
    true_ms, calls = {"a": 10.0, "b": 10.4}, [0]

    def drifting(step, iters, warmup):
        calls[0] += 1
        return step() * (1 + 0.001 * calls[0])

    steps = {name: (lambda ms=ms: ms) for name, ms in true_ms.items()}
    turns = {name: [drifting(step, 20, 3) for _ in range(30)] for name, step in steps.items()}
    assert sum(turns["b"]) / sum(turns["a"]) > 1.07  # each in turn: the drift counts as B's
    seen = []
    per_round = module.interleaved_rounds(steps, 30, 20, timer=lambda step, i, w: (seen.append(step()), drifting(step, i, w))[1])
    orders = {tuple(seen[i : i + 2]) for i in range(0, 60, 2)}  # each round a shuffled order
    assert len(per_round["a"]) == len(per_round["b"]) == 30 and orders == {(10.0, 10.4), (10.4, 10.0)}
    summary = module.interleaved_summary(per_round, ["a", "b"])
    ratio = summary["vs_best_baseline"]["b"]
    assert summary["best_baseline"] == "a" and abs(ratio["median"] - 1.04) < 0.00104
    assert ratio["ci95"][0] <= 1.04 <= ratio["ci95"][1] and ratio["ci95"][1] - ratio["ci95"][0] < 0.003
    assert summary["vs_best_baseline"]["a"] == {"median": 1.0, "ci95": [1.0, 1.0], "rounds": 30}
    with pytest.raises(ValueError, match="paired rounds"):
        module.paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="2 or more rounds"):
        module.interleaved_rounds(steps, 1, 20, timer=drifting)


def test_the_compiled_step_summary_takes_the_fastest_within_memory_and_prefers_interleaved_rounds():
    """sd15_compiled_step.summarize on made-up figures: the fastest 1.99-bit configuration within 0.3x the fastest FP16's
    memory is reported (a faster one over the budget is not); with interleaved rounds the headline comes from them,
    the step ratio with its interval and a target read at its upper end."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        module = _load("_sd15_compiled_step", REPO / "benchmarks" / "sd15_compiled_step.py")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    gb = 10**9
    configs = {"fp16_graph_cl": {"median_ms": 10.2, "peak_mem_bytes": 1.85 * gb},
               "fp16_compile_graph_cl": {"median_ms": 6.3, "peak_mem_bytes": 1.84 * gb},
               "lowbit_fast": {"median_ms": 6.5, "peak_mem_bytes": 0.6 * gb},
               "lowbit_small": {"median_ms": 6.7, "peak_mem_bytes": 0.5 * gb}}  # fmt: skip
    res = {"configs": configs, "best_fp16_config": "fp16_compile_graph_cl", "best_fp16_step_ms": 6.3, "fp16_peak_mem_bytes": 1.84 * gb}
    module.summarize(res)
    assert (res["timing"], res["lowbit_config"], res["step_ms"]) == ("sequential", "lowbit_small", 6.7)
    assert res["ratios"]["step_vs_best_fp16"] == pytest.approx(6.7 / 6.3) and res["targets"]["step_at_most_1.05x_best_fp16"] is False
    rounds = {"fp16_compile_graph_cl": [6.4, 6.3, 6.2], "fp16_graph_cl": [10.2] * 3, "lowbit_small": [6.6, 6.5, 6.55]}
    interleaved = _load("_interleaved_timing", REPO / "benchmarks" / "interleaved_timing.py")
    res["interleaved"] = interleaved.interleaved_summary(rounds, ["fp16_compile_graph_cl", "fp16_graph_cl"])
    module.summarize(res)
    ratios = [6.6 / 6.4, 6.5 / 6.3, 6.55 / 6.2]  # the last over 1.05
    assert (res["timing"], res["lowbit_config"], res["best_fp16_step_ms"]) == ("interleaved", "lowbit_small", 6.3)
    assert res["ratios"]["step_vs_best_fp16"] == pytest.approx(sorted(ratios)[1])
    assert res["ratios"]["step_vs_best_fp16_ci95"] == pytest.approx([min(ratios), max(ratios)], abs=1e-12)
    assert res["targets"] == {"step_at_most_1.05x_best_fp16": True, "peak_mem_at_most_0.3x_best_fp16": True,
                              "step_at_most_1.05x_best_fp16_at_ci95_upper": False}  # fmt: skip
    assert [c["config"] for c in res["curve"]] == ["lowbit_small"]  # the figures compared come from the same rounds
