#!/usr/bin/env bash
# SDXL on a GPU machine with no internet, in parts (each fits one call):
#   step   benchmarks/sdxl_step_and_memory.py: SDXL and SD-v1.5 at 1.99 bits against FP16 in one run (UNet step, its
#          peak memory, a whole generation's peak memory); one GPU
#   train  bf train on the full-size SDXL (random weights, the transferred 1.99-bit recipe, Stage I, batch 1 per GPU at
#          1024x1024, --grad-checkpoint) on one GPU, then on two under torchrun: step time and peak memory of each
#          (benchmarks/sdxl_train_scaling.py reads the two runs); needs the two-GPU machine. In two halves:
#          train-1gpu (on the first visible GPU) and train-2gpu (then the scaling), so the first can run beside other work
# Needs .whl/ for diffusers, peft and accelerate (carry it).
# usage: benchmarks/sdxl_gpu.sh OUT_DIR step|train|train-1gpu|train-2gpu [the script's args]
set -uo pipefail
out=$1; part=$2; shift 2
mkdir -p "$out"
repo=$PWD
source tools/device_env.sh
build_decode_library

if [ "$part" = step ]; then
  echo "== SDXL and SD-v1.5: UNet step and memory, 1.99 bits against FP16"
  (cd /tmp && python3 "$repo/benchmarks/sdxl_step_and_memory.py" --out "$out/sdxl_step_and_memory.json" "$@") 2>&1 \
    | grep --line-buffered -v "Loading weights\|should be kept in float32" | tee "$out/sdxl_step_and_memory.txt"
else
  steps=${STEPS:-12}
  # the model is written once, to a new name first: two halves started together never read it half-written
  if [ ! -e /tmp/sdxl/.complete ]; then
    rm -rf /tmp/sdxl.new
    (cd /tmp && python3 -m bf.cli random-model --arch sdxl --dtype fp16 --out /tmp/sdxl.new) && touch /tmp/sdxl.new/.complete \
      && rm -rf /tmp/sdxl && mv /tmp/sdxl.new /tmp/sdxl
  fi
  common=(--model /tmp/sdxl --recipe "$repo/results/sdxl_recipe_1.99.json" --images 32 --stage1-steps "$steps" --no-stage2
          --batch-size 1 --grad-checkpoint --bf16 --checkpoint-every 100000)
  if [ "$part" = train ] || [ "$part" = train-1gpu ]; then
    rm -rf /tmp/one.bfq /tmp/one.bfq.work
    echo "== bf train, SDXL, one GPU"
    gpu=${CUDA_VISIBLE_DEVICES:-0}; gpu=${gpu%%,*}
    (cd /tmp && CUDA_VISIBLE_DEVICES=$gpu python3 -m bf.cli train "${common[@]}" --device cuda --out /tmp/one.bfq "$@" 2>&1 \
       | grep -v "Loading weights" | tail -8) | tee "$out/sdxl_train_1gpu.txt"
    cp /tmp/one.bfq.work/log.csv "$out/sdxl_train_1gpu_log.csv" 2>/dev/null
  fi
  if [ "$part" = train ] || [ "$part" = train-2gpu ]; then
    rm -rf /tmp/two.bfq /tmp/two.bfq.work
    echo "== bf train, SDXL, two GPUs (torchrun, NCCL)"
    (cd /tmp && torchrun --standalone --nproc_per_node 2 -m bf.cli train "${common[@]}" --out /tmp/two.bfq "$@" \
       2>&1 | grep -v "Loading weights" | tail -8) | tee "$out/sdxl_train_2gpu.txt"
    cp /tmp/two.bfq.work/log.csv "$out/sdxl_train_2gpu_log.csv" 2>/dev/null
    python3 "$repo/benchmarks/sdxl_train_scaling.py" --run "1:$out/sdxl_train_1gpu" --run "2:$out/sdxl_train_2gpu" \
      --out "$out/sdxl_train_scaling.json"
  fi
fi
