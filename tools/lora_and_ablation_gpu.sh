#!/usr/bin/env bash
# The LoRA and quality runs on a GPU machine with no internet, in two calls (the second while the machine is warm):
#   start    timed first, on an otherwise idle GPU: a rank-16 LoRA's cost to the SD-v1.5 step
#            (benchmarks/sd15_compiled_step_gpu.sh lora) and the UNet in diffusers against FP16 (... diffusers);
#            then, in the background (they outlive the call): the ablation (tools/ablation_gpu.sh run, settings from
#            ROWS/CFGS/PROMPTS/SEEDS/IMAGES_PER_SPLIT/EVAL_BATCH, STEPS steps) and the LoRA new-concept proof
#            (tools/lora_new_concept.py, LORA_STEPS steps)
#   collect  waits for both background runs (at most WAIT seconds, default 540) and copies what they wrote into OUT_DIR
# Needs .whl/ for diffusers, peft and accelerate (carry it).
# usage: tools/lora_and_ablation_gpu.sh start|collect OUT_DIR
set -uo pipefail
phase=$1 out=$2
mkdir -p "$out" && out=$(cd "$out" && pwd)
repo=$PWD
keep=/tmp/lora_and_ablation  # the background runs' results: OUT_DIR is emptied before every call
source tools/device_env.sh
build_decode_library

if [ "$phase" = start ]; then
  SKIP_TIMED=${SKIP_TIMED:-0}
  if [ "$SKIP_TIMED" != 1 ]; then
    # each bounded (timeout signals the whole process group), so that the background runs start within the call; a
    # benchmark cut short leaves no JSON
    timeout "${TIMED_SECONDS:-270}" benchmarks/sd15_compiled_step_gpu.sh "$out" lora \
      --configs "${LORA_CONFIGS:-lowbit_compile,lowbit_streamed}"
    timeout "${TIMED_SECONDS:-270}" benchmarks/sd15_compiled_step_gpu.sh "$out" diffusers
  fi
  for run in ablation lora; do  # a start while an earlier one's runs go on would mix their outputs
    if [ -e "$keep/$run.log" ] && [ ! -e "$keep/$run.done" ]; then echo "the $run run of an earlier start is still going" >&2; exit 1; fi
  done
  rm -rf "$keep" && mkdir -p "$keep"
  setsid bash -c "DEADLINE=100000 tools/ablation_gpu.sh run '$keep' '${STEPS:-150}' > '$keep/ablation.log' 2>&1; touch '$keep/ablation.done'" \
    < /dev/null > /dev/null 2>&1 &
  setsid bash -c "cd /tmp && python3 '$repo/tools/lora_new_concept.py' --device cuda --steps '${LORA_STEPS:-2000}' --batch 32 \
      --seeds '${LORA_SEEDS:-4}' --eval-batch 256 --out '$keep/lora_new_concept.json' --grid '$keep/lora_new_concept.png' \
      --lora-out '$keep/diamond_lora.safetensors' > '$keep/lora_new_concept.log' 2>&1; touch '$keep/lora.done'" \
    < /dev/null > /dev/null 2>&1 &
  sleep 20
  tail -n 3 "$keep"/*.log
else
  SECONDS=0  # bounded: a run killed before it marks itself done must not hold the call to its limit
  while { [ ! -e "$keep/ablation.done" ] || [ ! -e "$keep/lora.done" ]; } && [ "$SECONDS" -lt "${WAIT:-540}" ]; do sleep 2; done
  grep -v "Loading weights" "$keep/lora_new_concept.log" | tail -n 25
  tail -n 25 "$keep/ablation.log"
  cp -r "$keep"/. "$out"/
fi
