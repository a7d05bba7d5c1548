#!/usr/bin/env bash
# The compiled SD-v1.5 step on a GPU machine with no internet:
#   1. pytest -m gpu                       the compiled low-bit layers against the decoded weights (tests/runtime/test_compiled_weights.py)
#   2. benchmarks/sd15_compiled_step.py    1.99 bits (streamed ring, compiled decode) against every FP16 configuration
# Needs .whl/ for diffusers (carry it). usage: benchmarks/sd15_compiled_step_gpu.sh OUT_DIR [sd15_compiled_step.py args]
set -uo pipefail
out=$1; shift
mkdir -p "$out"
repo=$PWD
source tools/device_env.sh
export BF_CACHE=/tmp/bfcache TORCHINDUCTOR_CACHE_DIR=/tmp/bfcache/torchinductor
build=/tmp/bfbuild
cmake -S plugins_trt -B $build -DBF_CUDA_ARCHITECTURES="90" | grep "bf:"
cmake --build $build -j16 --target bf_decode 2>&1 | grep -E "error|Built target" || true
export BF_DECODE_LIB=$build/libbf_decode.so

echo "== 1. pytest -m gpu: compiled low-bit layers"
(cd /tmp && python3 -m pytest -q -m gpu -p no:cacheprovider -o pythonpath= --rootdir "$repo" -c "$repo/pyproject.toml" \
   "$repo/tests/runtime/test_compiled_weights.py" 2>&1 | tail -15) | tee "$out/pytest_compiled.txt"

echo "== 2. SD-v1.5 UNet step: 1.99 bits against the fastest FP16"
(cd /tmp && python3 "$repo/benchmarks/sd15_compiled_step.py" --lib "$BF_DECODE_LIB" --out "$out/sd15_compiled_step.json" "$@") 2>&1 \
  | grep -v "Loading weights" | tee "$out/sd15_compiled_step.txt"
