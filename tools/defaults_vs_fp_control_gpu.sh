#!/usr/bin/env bash
# The shipped 1.99-bit model (bf train at its defaults: batch 64, lr 1e-4, 2000 + 1000 steps, 20000 shapes images)
# against the FP model and the same-budget FP control (bf train --fp-control at the same defaults: Stage II's 1000
# steps; its Stage I is the identity), on all four shapes-test splits at each CFG scale of $CFGS (default 3.5,7.5),
# with paired 95% intervals; then a small grid of the three models' images.
# The evals run as parallel processes in the background (setsid: one process leaves the GPU mostly idle), per CFG
# scale one for the 1.99-bit model against the FP model (which it also scores) and one for the control, merged by
# tools/merge_evals.py. A call that reaches $DEADLINE seconds (default 540) first stops waiting; then
# COLLECT=1 (the next call, on the same machine) waits for them and merges.
# Usage (repository root, on a GPU machine): tools/defaults_vs_fp_control_gpu.sh OUT [PROMPTS [SEEDS]]
#   IMAGES_PER_SPLIT: bf eval --images-per-split (e.g. 900 with shapes-test:840, every split's every prompt: about
#   +-0.03 on every split); NO_REFERENCE=1: each model in its own process, no PSNR against the FP model (faster)
# OUT receives control.txt, control_log.csv, eval.json, eval.txt, evals.tar (each process's JSON and log), grid.png.
set -uo pipefail
CFGS=${CFGS:-3.5,7.5}
out=$(realpath "$1"); prompts=${2:-shapes-test:150}; seeds=${3:-2}; repo=$(pwd)
mkdir -p "$out"
source tools/device_env.sh
cd /tmp || exit 1
export BF_PROGRESS_SECONDS=20
control=/tmp/control evals=/tmp/evals
if [ -z "${COLLECT:-}" ]; then
  python3 -m bf.cli train --fp-control --cuda-graph --work /tmp/control.work --out "$control" 2>&1 | tee "$out/control.txt" | tail -6
  cp /tmp/control.work/log.csv "$out/control_log.csv" 2>/dev/null
  rm -rf "$evals" && mkdir -p "$evals"
  common=(--prompts "$prompts" --seeds "$seeds" --images-per-split "${IMAGES_PER_SPLIT:-0}" --batch-size 128)
  jobs=""
  for cfg in ${CFGS//,/ }; do
    if [ -n "${NO_REFERENCE:-}" ]; then
      for m in shipped-1.99bit:quantized shipped:fp "$control":control; do
        jobs+="python3 -m bf.cli eval --model ${m%:*} ${common[*]} --cfg $cfg --json $evals/${m##*:}_$cfg.json > $evals/${m##*:}_$cfg.log 2>&1 & "
      done
      continue
    fi
    jobs+="python3 -m bf.cli eval --model shipped-1.99bit --model shipped --reference shipped ${common[*]} --cfg $cfg \
      --json $evals/quantized_$cfg.json > $evals/quantized_$cfg.log 2>&1 & "
    jobs+="python3 -m bf.cli eval --model $control ${common[*]} --cfg $cfg --json $evals/control_$cfg.json > $evals/control_$cfg.log 2>&1 & "
  done
  setsid bash -c "start=\$SECONDS; $jobs wait; echo \"evals: \$((SECONDS - start)) s\" > $evals/seconds.txt; touch $evals/done" < /dev/null > "$evals/background.log" 2>&1 &
  while [ ! -e "$evals/done" ] && [ "$SECONDS" -lt "${DEADLINE:-540}" ]; do sleep 1; done
else
  while [ ! -e "$evals/done" ]; do sleep 1; done
fi
if [ ! -e "$evals/done" ]; then
  echo "the evals are still running: call again with COLLECT=1"; tail -n 1 "$evals"/*.log; exit 0
fi
cat "$evals/seconds.txt"; tail -n 2 "$evals"/*.log
python3 "$repo/tools/merge_evals.py" "$evals"/*.json --order shapes-sd-1.99bit.bfq,control,shapes-sd --out "$out/eval.json" \
  2>&1 | tee "$out/eval.txt" | tail -40
(cd "$evals" && tar cf "$out/evals.tar" ./*.json ./*.log)
python3 -m bf.cli eval --model shipped-1.99bit --model "$control" --reference shipped --limit 3 --cfg "$CFGS" \
  --batch-size 64 --grid "$out/grid.png" > /dev/null 2>&1 || echo "grid failed"
