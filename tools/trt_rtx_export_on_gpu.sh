#!/usr/bin/env bash
# On a GPU machine without TensorRT for RTX (an H100/H200: compute capability 9.0, which TensorRT for
# RTX does not target): what `bf infer` does with a `--target trt-rtx` export built elsewhere.
#   1. --backend trt refuses in one line, naming the engines' compute capabilities and --backend torch;
#   2. --backend ort runs the same directory's onnx-qdq graphs and reports the execution provider;
#   3. pytest -m gpu tests/runtime/test_runtime_trt.py (the ctypes CUDA runtime the trt backend uses).
# Usage (repository root): tools/trt_rtx_export_on_gpu.sh EXPORT_DIR OUT
set -uo pipefail
export_dir=$(realpath "$1"); out=$(realpath "$2"); repo=$(pwd)
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/bfpkg . 2>&1 | tail -2
export PYTHONPATH=/tmp/bfpkg PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$out/gpu.txt"
cd /tmp || exit 1
echo "== 1. bf infer --backend trt"
python3 -m bf.cli infer "$export_dir" --prompt "a red circle" --steps 4 --backend trt --out /tmp/trt.png > "$out/infer_trt.txt" 2>&1
echo "exit code $?" >> "$out/infer_trt.txt"; cat "$out/infer_trt.txt"
echo "== 2. bf infer --backend ort"
python3 -m bf.cli infer "$export_dir" --prompt "a red circle" --steps 4 --out "$out/ort.png" --json > "$out/infer_ort.json" 2> "$out/infer_ort.txt"
echo "exit code $?"; cat "$out/infer_ort.json"
echo "== 3. pytest -m gpu tests/runtime/test_runtime_trt.py"
python3 -m pytest -q -m gpu -p no:cacheprovider -o pythonpath= --rootdir "$repo" -c "$repo/pyproject.toml" "$repo/tests/runtime/test_runtime_trt.py" 2>&1 | tail -6 | tee "$out/pytest_gpu.txt"
