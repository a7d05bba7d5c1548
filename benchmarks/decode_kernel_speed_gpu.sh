#!/usr/bin/env bash
# The decode kernels' three GPU verifications in one call of a machine with no internet (see plugins_trt/README.md):
#   1. pytest -m gpu tests/plugins_trt/test_native.py    (CUDA decode bit for bit against the numpy reference)
#   2. benchmarks/decode_kernel_speed.py          (bandwidth per width, whole-UNet decode vs its floor)
#   3. bf_plugin_harness                     (the IPluginV3 class, built against TensorRT's headers, driven directly)
# Needs build/third_party/{tensorrt,onnxruntime} (carry them) and .whl/ for diffusers.
# With BASELINE_DIR (an earlier revision's plugins_trt/, e.g. from `git archive REV plugins_trt`, carried),
# step 2 also times that revision's kernels in the same run, into decode_gpu_baseline.json.
# usage: benchmarks/decode_kernel_speed_gpu.sh OUT_DIR [BASELINE_DIR]
set -euo pipefail
out=$1
baseline=${2:-}
mkdir -p "$out"
repo=$PWD
source tools/device_env.sh
nvcc --version | tail -1
build=/tmp/bfbuild
cmake -S plugins_trt -B $build -DBF_CUDA_ARCHITECTURES="90" \
  -DTENSORRT_INCLUDE_DIR="$repo/build/third_party/tensorrt/include" \
  -DORT_INCLUDE_DIR="$repo/build/third_party/onnxruntime/usr/include/onnxruntime" | grep "bf:"
cmake --build $build -j16 2>&1 | grep -E "error|Built target" || true
nvcc -std=c++17 -O3 -arch=sm_90 -Iplugins_trt/include -Iplugins_trt/src -Xptxas -v -c plugins_trt/src/decode_cuda.cu -o /tmp/dc.o \
  2>&1 | grep -E "registers|spill" | sort | uniq -c | sort -rn | head -5 > "$out/ptxas.txt" || true

echo "== 1. kernel correctness (pytest -m gpu)"
(cd /tmp && BF_DECODE_LIB=$build/libbf_decode.so python3 -m pytest -q -m gpu -p no:cacheprovider \
   --rootdir "$repo" -c "$repo/pyproject.toml" "$repo/tests/plugins_trt/test_native.py" 2>&1 | tail -4) | tee "$out/pytest_gpu.txt"

echo "== 3. plugin harness"
$build/bf_plugin_harness --json "$out/plugin_harness.json" | tail -5 | tee "$out/plugin_harness.txt"

decode_speed() {  # BUILD_DIR NAME: decode_kernel_speed.py on that build's library, into NAME.json and NAME.txt
  (cd /tmp && python3 "$repo/benchmarks/decode_kernel_speed.py" --lib "$1/libbf_decode.so" --out "$out/$2.json") | tee "$out/$2.txt"
}

echo "== 2. decode speed"
decode_speed $build decode_gpu
if [ -n "$baseline" ]; then
  echo "== 2b. decode speed of the baseline, $baseline"
  cmake -S "$baseline" -B /tmp/bfbase -DBF_CUDA_ARCHITECTURES="90" | grep "bf:"
  cmake --build /tmp/bfbase -j16 --target bf_decode 2>&1 | grep -E "error|Built target" || true
  decode_speed /tmp/bfbase decode_gpu_baseline
fi
