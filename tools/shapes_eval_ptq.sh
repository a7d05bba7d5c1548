#!/usr/bin/env bash
# The shipped model and its plain min-max PTQ checkpoints at 2, 3 and 4 bits, evaluated
# together (CFG 7.5, PNDM 50 steps, 2 seeds, the shipped model as the fidelity reference).
# Writes results/shapes_eval_ptq.json and .png.   usage: tools/shapes_eval_ptq.sh [WORK_DIR]
set -euo pipefail
work=${1:-$(mktemp -d)}
models=(--model shipped)
for b in 2 3 4; do
  bf quantize --bits "$b" --grid plain --init minmax --out "$work/plain-minmax-${b}bit.bfq" --force
  models+=(--model "$work/plain-minmax-${b}bit.bfq")
done
time bf eval "${models[@]}" --reference shipped --cfg 7.5 --seeds 2 \
  --json results/shapes_eval_ptq.json --grid results/shapes_eval_ptq.png
