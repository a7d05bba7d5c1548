#!/usr/bin/env bash
# The GPU measurements of one session on the two-GPU machine (no internet), in calls of at most ten minutes; the runs
# outlive the calls (setsid), so each call after the first only waits, reports and copies:
#   start    GPU 1: the ablation (tools/ablation_gpu.sh run; ROWS, CFGS, PROMPTS, SEEDS, IMAGES_PER_SPLIT, EVAL_BATCH, STEPS
#            as there); GPU 0, one after another: a LoRA's cost to the step (benchmarks/sd15_compiled_step_gpu.sh lora),
#            the UNet in diffusers with its GPU tests (... diffusers), SDXL and SD-v1.5 step and memory
#            (benchmarks/sdxl_gpu.sh step, with STEP_ARGS), the compiled path's GPU tests (benchmarks/sd15_compiled_step_gpu.sh
#            checks, only when PARTS names it: on GPU 1 after one-GPU training when that runs there); SDXL training on
#            one GPU (benchmarks/sdxl_gpu.sh train-1gpu: on GPU 1 at once when the ablation is not selected, else after
#            it) and on two (train-2gpu, once both GPUs are free).
#            PARTS (default lora,diffusers,sdxl-step,ablation,sdxl-train) picks runs.
#   wait     waits until every run has finished or WAIT seconds (default 540) have passed, and says where each is
#   collect  what the runs wrote (JSON, plots, text, logs) as OUT_DIR/runs.tar.gz
# Needs .whl/ for diffusers, peft and accelerate (carry it).
# usage: tools/two_gpu_runs.sh start|wait|collect OUT_DIR
set -uo pipefail
phase=$1 out=$2
mkdir -p "$out" && out=$(cd "$out" && pwd)
keep=/tmp/two_gpu_runs  # what the runs write: OUT_DIR is emptied before every call
parts=",${PARTS:-lora,diffusers,sdxl-step,ablation,sdxl-train},"
wanted() { [[ $parts == *",$1,"* ]]; }
source tools/device_env.sh
build_decode_library

status() {
  for run in gpu0 ablation train; do
    if [ -e "$keep/$run.done" ]; then echo "$run: done"
    elif [ -e "$keep/$run.log" ]; then echo "$run: running: $(tail -c 300 "$keep/$run.log" | tr '\r' '\n' | tail -n 1)"
    fi
  done
}
finished() { for run in gpu0 ablation train; do [ -e "$keep/$run.log" ] && [ ! -e "$keep/$run.done" ] && return 1; done; return 0; }

case $phase in
  start)
    if [ -d "$keep" ] && ! finished; then echo "an earlier start's runs are still going: wait, or collect" >&2; exit 1; fi
    rm -rf "$keep" && mkdir -p "$keep/gpu0" "$keep/ablation" "$keep/train"
    # every selected run's log exists before any run starts: the waiting below reads them as "selected"
    wanted ablation && : > "$keep/ablation.log"
    wanted sdxl-train && : > "$keep/train.log"
    if wanted ablation; then
      setsid bash -c "CUDA_VISIBLE_DEVICES=1 DEADLINE=100000 tools/ablation_gpu.sh run '$keep/ablation' '${STEPS:-150}'; \
        touch '$keep/ablation.done'" < /dev/null >> "$keep/ablation.log" 2>&1 &
    fi
    gpu0=()
    wanted lora && gpu0+=("benchmarks/sd15_compiled_step_gpu.sh '$keep/gpu0' lora --configs lowbit_compile,lowbit_streamed")
    wanted diffusers && gpu0+=("benchmarks/sd15_compiled_step_gpu.sh '$keep/gpu0' diffusers")
    wanted sdxl-step && gpu0+=("benchmarks/sdxl_gpu.sh '$keep/gpu0' step ${STEP_ARGS:-}")
    # the compiled path's GPU tests: on GPU 1 after one-GPU training when that runs there, else on GPU 0
    checks_on_gpu1=""
    if wanted checks; then
      if wanted sdxl-train && ! wanted ablation; then checks_on_gpu1="benchmarks/sd15_compiled_step_gpu.sh '$keep/train' checks;"
      else gpu0+=("benchmarks/sd15_compiled_step_gpu.sh '$keep/gpu0' checks"); fi
    fi
    if [ ${#gpu0[@]} -gt 0 ]; then
      : > "$keep/gpu0.log"  # before the training run below looks for it (nothing on GPU 0: no log, no wait)
      joined=$(printf '%s; ' "${gpu0[@]}")
      setsid bash -c "export CUDA_VISIBLE_DEVICES=0; $joined touch '$keep/gpu0.done'" < /dev/null >> "$keep/gpu0.log" 2>&1 &
    fi
    if wanted sdxl-train; then
      # one GPU: on GPU 1 at once when the ablation does not hold it, else after the other runs; two GPUs: after them
      first="benchmarks/sdxl_gpu.sh '$keep/train' train-1gpu; $checks_on_gpu1" second=train-2gpu
      wanted ablation && first="" second=train
      setsid bash -c "${first:+export CUDA_VISIBLE_DEVICES=1; $first unset CUDA_VISIBLE_DEVICES;} while [ ! -e '$keep/gpu0.done' ] && [ -e '$keep/gpu0.log' ] || \
        { [ ! -e '$keep/ablation.done' ] && [ -e '$keep/ablation.log' ]; }; do sleep 2; done; \
        benchmarks/sdxl_gpu.sh '$keep/train' $second; touch '$keep/train.done'" \
        < /dev/null >> "$keep/train.log" 2>&1 &
    fi
    sleep 30
    status
    ;;
  wait)
    SECONDS=0
    while ! finished && [ "$SECONDS" -lt "${WAIT:-540}" ]; do sleep 5; done
    status
    ;;
  collect)
    # one archive (a call returns at most 8 files): the runs' JSON, plots, text and logs, by run
    status | tee "$out/status.txt"
    (cd "$keep" && find . -maxdepth 2 -type f \( -name '*.json' -o -name '*.png' -o -name '*.txt' -o -name '*.csv' -o -name '*.log' \) \
      -print0 | tar czf "$out/runs.tar.gz" --null -T -)
    tar tzf "$out/runs.tar.gz"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
