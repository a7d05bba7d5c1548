#!/usr/bin/env bash
# The SD-v1.5 GPU measurements and checks in one call of a machine with no internet:
#   0. pytest -m gpu                   the fused low-bit kernels (Triton) against float64 references
#   1. benchmarks/sd15_unet_step.py    SD-v1.5 UNet at 1.99 bits vs FP16: size, step time, decode, peak memory
#   2. pytest -m gpu                   streamed weights (and fused layers), torch backend vs ort, CUDA graph calls of the trt backend
#   3. bf bench --backend torch        the command on the shipped model (JSON and plot)
# Needs .whl/ for diffusers (carry it). usage: benchmarks/sd15_unet_step_gpu.sh OUT_DIR [sd15_unet_step.py args]
set -uo pipefail
out=$1; shift
mkdir -p "$out"
repo=$PWD
source tools/device_env.sh
build_decode_library

pytest_gpu() {
  (cd /tmp && python3 -m pytest -q -m gpu -p no:cacheprovider -o pythonpath= --rootdir "$repo" -c "$repo/pyproject.toml" "$@" 2>&1 | tail -15)
}

echo "== 0. pytest -m gpu: fused low-bit kernels"
pytest_gpu "$repo/tests/runtime/test_fused_kernels.py" | tee "$out/pytest_fused.txt"

echo "== 1. SD-v1.5 UNet: 1.99 bits streamed vs FP16"
(cd /tmp && python3 "$repo/benchmarks/sd15_unet_step.py" --out "$out/bench_sd15_gpu.json" "$@") 2>&1 | tee "$out/bench_sd15.txt"

echo "== 2. pytest -m gpu"
pytest_gpu "$repo/tests/runtime/test_streamed_weights.py" "$repo/tests/runtime/test_runtime_infer.py" "$repo/tests/runtime/test_runtime_trt.py" | tee "$out/pytest_gpu.txt"

echo "== 3. bf bench --backend torch (shipped model)"
(cd /tmp && python3 -m bf.cli bench --backend torch --batch 1,2 --json "$out/bench_shipped_torch.json" --plot "$out/bench_shipped_torch.png" \
   2>&1 | grep -v "Loading weights" | tail -15) | tee "$out/bench_shipped_torch.txt"
