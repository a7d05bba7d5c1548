#!/usr/bin/env bash
# The compiled UNet step on a GPU machine with no internet, in parts (each fits one call):
#   step     benchmarks/sd15_compiled_step.py: SD-v1.5 at 1.99 bits (streamed ring, compiled decode) against every
#            FP16 configuration, with the kernel profile of the best of each
#   checks   pytest -m gpu (the compiled low-bit layers and the torch backend, compiled included, against the
#            decoded weights and ONNX Runtime), then bf bench --backend torch --compile on the shipped model twice:
#            the second process finds inductor's cache warm
#   fused    pytest -m gpu of the fused layers in a compiled step (the layers, and the torch backend compiled with
#            --fused on against ONNX Runtime), then bf bench --backend torch --compile --fused auto on the shipped model
#   lora     benchmarks/sd15_lora_step.py: a rank-16 LoRA on every attention projection, its cost to the step
#   diffusers  benchmarks/sd15_diffusers_unet_step.py: the UNet in diffusers, bitsfusion backend against FP16, then
#            pytest -m gpu of the LoRA and diffusers paths
#   reuse    benchmarks/sd15_ahead_buffer_reuse.py: decoding ahead, compiled with inductor's buffer reuse and without
#   layers   benchmarks/sd15_layer_paths.py: every layer class of the step on each way to get its weight (decode into a
#            buffer, into one reused buffer, im2col + matrix product, the fused kernel with --fused), L2-cold, against FP16
#   kernels  benchmarks/lowbit_kernel_ablation.py: the fused kernels on the layers that hold most weight bytes (the
#            Triton kernel, the same kernel on FP16 weights with its decode left out, the Hopper TMA kernel;
#            --columns picks), against cuDNN / cuBLAS
# Needs .whl/ for diffusers, peft and accelerate (carry it).
# usage: benchmarks/sd15_compiled_step_gpu.sh OUT_DIR step|checks|fused|lora|diffusers|layers|reuse|kernels [the script's args]
set -uo pipefail
out=$1; part=$2; shift 2
case "$part" in
  step|checks|fused|lora|diffusers|layers|reuse|kernels) ;;
  *) echo "unknown part '$part': give step, checks, fused, lora, diffusers, layers, reuse or kernels" >&2; exit 2 ;;
esac
mkdir -p "$out"
repo=$PWD
source tools/device_env.sh
build_decode_library

if [ "$part" = step ]; then
  echo "== SD-v1.5 UNet step: 1.99 bits against the fastest FP16"
  (cd /tmp && python3 "$repo/benchmarks/sd15_compiled_step.py" --lib "$BF_DECODE_LIB" --out "$out/sd15_compiled_step.json" "$@") 2>&1 \
    | grep -v "Loading weights" | tee "$out/sd15_compiled_step.txt"
elif [ "$part" = lora ]; then
  echo "== SD-v1.5 UNet step: a rank-16 LoRA's cost"
  (cd /tmp && python3 "$repo/benchmarks/sd15_lora_step.py" --lib "$BF_DECODE_LIB" --out "$out/sd15_lora_step.json" "$@") 2>&1 \
    | grep -v "Loading weights" | tee "$out/sd15_lora_step.txt"
elif [ "$part" = layers ]; then
  echo "== SD-v1.5's layers, each way to get a weight, L2-cold, against FP16"
  (cd /tmp && python3 "$repo/benchmarks/sd15_layer_paths.py" --lib "$BF_DECODE_LIB" --out "$out/sd15_layer_paths.json" "$@") 2>&1 \
    | grep --line-buffered -v "Loading weights" | tee "$out/sd15_layer_paths.txt"
elif [ "$part" = kernels ]; then
  echo "== the fused low-bit kernel: where its time goes, against cuDNN / cuBLAS"
  (cd /tmp && python3 "$repo/benchmarks/lowbit_kernel_ablation.py" --out "$out/lowbit_kernel_ablation.json" "$@") 2>&1 \
    | tee "$out/lowbit_kernel_ablation.txt"
elif [ "$part" = reuse ]; then
  echo "== SD-v1.5 decoding ahead: inductor's buffer reuse on and off"
  (cd /tmp && python3 "$repo/benchmarks/sd15_ahead_buffer_reuse.py" --lib "$BF_DECODE_LIB" --out "$out/sd15_ahead_buffer_reuse.json" "$@") 2>&1 \
    | grep --line-buffered -v "Loading weights" | tee "$out/sd15_ahead_buffer_reuse.txt"
elif [ "$part" = diffusers ]; then
  echo "== SD-v1.5 UNet in diffusers: bitsfusion backend against FP16"
  (cd /tmp && python3 "$repo/benchmarks/sd15_diffusers_unet_step.py" --lib "$BF_DECODE_LIB" --out "$out/sd15_diffusers_unet_step.json" \
     "$@") 2>&1 | grep -v "Loading weights" | tee "$out/sd15_diffusers_unet_step.txt"
  echo "== pytest -m gpu: LoRA on the torch backend, bitsfusion in diffusers"
  (cd /tmp && python3 -m pytest -q -m gpu -p no:cacheprovider -o pythonpath= --rootdir "$repo" -c "$repo/pyproject.toml" \
     "$repo/tests/runtime/test_runtime_lora.py" "$repo/tests/diffusers_backend" 2>&1 | tail -15) | tee "$out/pytest_lora.txt"
elif [ "$part" = checks ]; then
  echo "== pytest -m gpu: compiled low-bit layers, torch backend"
  (cd /tmp && python3 -m pytest -q -m gpu -p no:cacheprovider -o pythonpath= --rootdir "$repo" -c "$repo/pyproject.toml" \
     "$repo/tests/runtime/test_compiled_weights.py" "$repo/tests/runtime/test_runtime_infer.py" 2>&1 | tail -15) | tee "$out/pytest_compiled.txt"
  for run in 1 2; do
    echo "== bf bench --backend torch --compile (shipped model), process $run"
    (cd /tmp && python3 -m bf.cli bench --backend torch --compile --batch 1,2 --json "$out/bench_shipped_torch_compile_$run.json" \
       2>&1 | grep -v "Loading weights" | tail -24) | tee "$out/bench_shipped_torch_compile_$run.txt"
  done
elif [ "$part" = fused ]; then
  echo "== pytest -m gpu: fused layers in a compiled step, torch backend compiled with them"
  (cd /tmp && python3 -m pytest -q -m gpu -p no:cacheprovider -o pythonpath= --rootdir "$repo" -c "$repo/pyproject.toml" \
     "$repo/tests/runtime/test_compiled_fused.py" "$repo/tests/runtime/test_fused_kernels.py" \
     "$repo/tests/runtime/test_runtime_infer.py::test_torch_backend_on_the_gpu_matches_ort" \
     "$repo/tests/runtime/test_runtime_infer.py::test_compiled_with_fused_layers_the_smallest_others_stay_decoded_and_the_image_matches_ort" \
     2>&1 | tail -15) | tee "$out/pytest_compiled_fused_backend.txt"
  echo "== bf bench --backend torch --compile --fused auto (shipped model)"
  (cd /tmp && python3 -m bf.cli bench --backend torch --compile --fused auto --batch 1,2 --json "$out/bench_shipped_torch_compile_fused.json" \
     2>&1 | grep -v "Loading weights" | tail -40) | tee "$out/bench_shipped_torch_compile_fused.txt"
fi
