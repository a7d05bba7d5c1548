#!/usr/bin/env bash
# bf train at its defaults on the shipped model with the 1.99-bit recipe (one GPU, CUDA graph), shortened
# to 900 + 450 steps, then packed, inspected and evaluated against the FP model on a few prompts.
# Usage (repository root, on a GPU machine): tools/train_defaults_gpu.sh OUT
set -uo pipefail
out=$(realpath "$1"); repo=$(pwd)
mkdir -p "$out"
source tools/device_env.sh
cd /tmp || exit 1
export BF_PROGRESS_SECONDS=30
python3 -m bf.cli train --recipe "$repo/results/shapes_recipe_1.99.json" --cuda-graph --stage1-steps 900 --stage2-steps 450 \
  --work /tmp/train-defaults --out /tmp/defaults.bfq 2>&1 | tee "$out/train.txt" | tail -12
echo "train exit code ${PIPESTATUS[0]}"
cp /tmp/train-defaults/log.csv "$out/log.csv" 2>/dev/null
python3 -m bf.cli inspect /tmp/defaults.bfq --json > "$out/inspect.json" && tail -c 400 "$out/inspect.json"
python3 -m bf.cli eval --model /tmp/defaults.bfq --reference shipped --cfg 7.5 --limit 10 --json "$out/eval.json" 2>&1 | tail -14
