#!/usr/bin/env bash
# The GPU runs behind the ablation's figures, one phase per call of a machine with no internet:
#   analyze  bf analyze of the shipped model (8 workers) -> results/shapes_analysis.json (+ .png),
#            bf allocate 1.99 bits -> results/shapes_recipe_1.99.json
#   train    the ablation rows in $ROWS (tools/ablation.py --phase train; fpctl: the FP control), STEPS steps each at batch $BATCH;
#            STEPS=auto: first time 4 parallel trainings, then take as many steps as fit in $TRAIN_SECONDS
#   eval     the ablation rows at CFG 3.5/5.5/7.5/9.5 on $PROMPTS (default shapes-test:100) with $SEEDS seeds (default 2)
#            (.rows/ holds the train phase's tars when the machine is new),
#            then benchmarks/sd15_qat_step.py -> results/qat_sd15_throughput.json
#   budgets  the same rows trained 0 steps (PTQ) and STEPS steps -> results/ablation_steps{0,STEPS}.json
#   run      train, eval and table in one go, the eval in the background (setsid) so that it outlives a call that ends
#            $DEADLINE seconds after this script started (default 540); then
#   collect  (the next call, on the same machine) waits for that eval and writes the table
#            eval, run and collect take CFGS (default 3.5,5.5,7.5,9.5), IMAGES_PER_SPLIT (bf eval --images-per-split) and
#            EVAL_BATCH (images generated at once per row, default 128)
# usage: tools/ablation_gpu.sh PHASE OUT_DIR [STEPS]
# Wheels the machine lacks are in .whl/ (see the README's device notes); elsewhere: pip install -e '.[train,plot]'.
set -euo pipefail
phase=$1 out=$2 steps=${3:-800} batch=${BATCH:-256} rows=${ROWS:-lsq2,balance,altinit,mixed}
only=(); [ -n "${ROWS:-}" ] && only=(--rows "$ROWS")  # eval and table: every row trained, unless ROWS says
work=${WORK:-/tmp/ablation}
mkdir -p "$out" "$work"
source tools/device_env.sh
repo=$PWD
cd "$work"  # not the source tree: its bf/ would shadow the installed package
recipe=$repo/results/shapes_recipe_1.99.json
eval_args=(--prompts "${PROMPTS:-shapes-test:100}" --seeds "${SEEDS:-2}" --cfg "${CFGS:-3.5,5.5,7.5,9.5}"
           --images-per-split "${IMAGES_PER_SPLIT:-0}")
evaluate_rows() {
  time python3 "$repo/tools/ablation.py" --work "$work" --recipe "$recipe" --steps "$steps" "${only[@]}" --phase eval \
    --eval-batch "${EVAL_BATCH:-128}" "${eval_args[@]}"
}
table_to() {
  python3 "$repo/tools/ablation.py" --work "$work" --recipe "$recipe" --steps "$steps" "${only[@]}" --batch-size "$batch" \
    --images "${IMAGES:-10000}" --phase table "${eval_args[@]}" --json "$1/ablation.json" --plot "$1/ablation.png"
}
case $phase in
  analyze)
    # 8 prompts per split, 1 seed: 24 images per candidate; resumes part files left by an interrupted call
    (time timeout "${ANALYZE_TIMEOUT:-420}" python3 -m bf.cli analyze --workers 8 --limit 8 --batch-size 32 \
      --out "$repo/results/shapes_analysis.json" --plot "$repo/results/shapes_analysis.png" \
      $( [ -e "$repo/results/shapes_analysis.json.part0of8" ] && echo --resume )) || echo "analyze stopped: $?"
    cp "$repo"/results/shapes_analysis.json* "$out"/ 2>/dev/null || true
    cp "$repo"/results/shapes_analysis.png "$out"/ 2>/dev/null || true
    [ -e "$repo/results/shapes_analysis.json" ] && python3 -m bf.cli allocate "$repo/results/shapes_analysis.json" \
      --target-bits 1.99 --out "$out/shapes_recipe_1.99.json" | tee "$out/allocate.txt"
    ;;
  train)
    recipe=$repo/results/shapes_recipe_1.99.json
    if [ "$steps" = auto ]; then
      t0=$(date +%s)
      for k in 1 2 3 4; do
        python3 -m bf.cli train --recipe "$recipe" --stage1-steps 40 --no-stage2 --images 2000 --batch-size "$batch" \
          --checkpoint-every 1000 --out "probe$k.bfq" > "probe$k.log" 2>&1 &
      done
      wait
      # it/s of one of 4 processes sharing the GPU, between steps 10 and 40 (after warm-up)
      rate=$(python3 -c "import csv; r=list(csv.DictReader(open('probe1.bfq.work/log.csv'))); print(30/(float(r[39]['seconds'])-float(r[9]['seconds'])))")
      left=$(( ${TRAIN_SECONDS:-540} - ($(date +%s) - t0) - 60 ))
      steps=$(python3 -c "print(int($rate*$left*0.9)//100*100)")
      echo "probe: $rate it/s per process (4 at once); $left s left: $steps steps" | tee "$out/probe.txt"
    fi
    time python3 "$repo/tools/ablation.py" --work "$work" --recipe "$recipe" --steps "$steps" --batch-size "$batch" --phase train \
      --images "${IMAGES:-10000}" \
      --rows "$rows"
    for k in ${rows//,/ }; do
      m=$k.bfq; [ "$k" = fpctl ] && m=fpctl  # the FP control is a model directory
      tar cf "$out/$k.tar" "$m" "$m.work/log.csv" "$k.train.log"
    done
    cp train_seconds.json "$out/train_seconds_${rows//,/_}.json"
    ;;
  eval)
    for t in "$repo"/.rows/*.tar; do [ -e "$t" ] && tar xf "$t"; done
    [ -e "$repo/.rows/train_seconds.json" ] && cp "$repo/.rows/train_seconds.json" .
    evaluate_rows
    table_to "$out"
    tar cf "$out/evals.tar" ./*.eval.json ./*.eval.log
    time python3 "$repo/benchmarks/sd15_qat_step.py" --batch 8 --json "$out/qat_sd15_throughput.json"
    ;;
  run)
    time python3 "$repo/tools/ablation.py" --work "$work" --recipe "$recipe" --steps "$steps" --batch-size "$batch" --phase train \
      --images "${IMAGES:-10000}" --rows "$rows" || exit 1
    rm -f eval.done
    setsid bash -c "$(declare -p repo work recipe steps only eval_args); $(declare -f evaluate_rows); evaluate_rows > eval.out 2>&1; \
      touch eval.done" < /dev/null > eval.bg.log 2>&1 &
    while [ ! -e eval.done ] && [ "$SECONDS" -lt "${DEADLINE:-540}" ]; do sleep 1; done
    if [ -e eval.done ]; then table_to "$out"; tar cf "$out/evals.tar" ./*.eval.json ./*.eval.log train_seconds.json eval.out
    else echo "the eval is still running: call the collect phase next"; tail -n 3 ./*.eval.log || true; fi
    ;;
  collect)
    while [ ! -e eval.done ]; do sleep 1; done
    cat eval.out | tail -n 5
    table_to "$out"
    tar cf "$out/evals.tar" ./*.eval.json ./*.eval.log train_seconds.json eval.out
    ;;
  budgets)
    # the same rows at smaller training budgets: 0 steps (the initialisation alone, i.e. PTQ) and $steps steps
    mkdir -p b0 bN
    tar xf "$repo/.rows/evals.tar" ./fp.eval.json && cp fp.eval.json b0/ && cp fp.eval.json bN/
    abl() { python3 "$repo/tools/ablation.py" --recipe "$repo/results/shapes_recipe_1.99.json" --batch-size "$batch" --images 10000 "$@"; }
    abl --work b0 --steps 0 --rows lsq2,balance,altinit,mixed --phase train > b0.log 2>&1 &
    abl --work bN --steps "$steps" --phase train > bN.log 2>&1 &
    wait
    tail -n 3 b0.log bN.log
    abl --work b0 --steps 0 --rows lsq2,balance,altinit,mixed --phase eval --eval-batch 128 > b0e.log 2>&1 &
    abl --work bN --steps "$steps" --phase eval --eval-batch 128 > bNe.log 2>&1 &
    wait
    abl --work b0 --steps 0 --rows lsq2,balance,altinit,mixed --phase table --json "$out/ablation_steps0.json" --plot "$out/ablation_steps0.png"
    abl --work bN --steps "$steps" --phase table --json "$out/ablation_steps$steps.json" --plot "$out/ablation_steps$steps.png"
    tar cf "$out/budgets.tar" b0/*.eval.json bN/*.eval.json b0/*.log bN/*.log ./*.log
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
