#!/usr/bin/env bash
# The shipped BitsFusion model: bf train at its defaults (batch 64, lr 1e-4, 2000 + 1000 steps, 20000 shapes
# images) on the shipped model with the 1.99-bit recipe allocated from its sensitivity analysis
# (results/shapes_recipe_1.99.json), on one GPU with --cuda-graph. Then inspected, and evaluated on every
# shapes-test prompt at CFG 7.5 with 2 seeds, next to the FP model and a 2-bit post-training quantization.
# Usage (repository root, on a GPU machine): tools/shipped_bitsfusion_gpu.sh OUT
# OUT receives shapes-sd-1.99bit.bfq (copied to bf/assets/ by hand), train.txt, log.csv, inspect.json, eval.json.
set -uo pipefail
out=$(realpath "$1"); repo=$(pwd)
mkdir -p "$out"
source tools/device_env.sh
cd /tmp || exit 1
export BF_PROGRESS_SECONDS=20
python3 -m bf.cli train --recipe "$repo/results/shapes_recipe_1.99.json" --cuda-graph \
  --work /tmp/train-shipped --out "$out/shapes-sd-1.99bit.bfq" 2>&1 | tee "$out/train.txt" | tail -12
echo "train exit code ${PIPESTATUS[0]}"
cp /tmp/train-shipped/log.csv "$out/log.csv" 2>/dev/null
python3 -m bf.cli inspect "$out/shapes-sd-1.99bit.bfq" --json > "$out/inspect.json" && tail -c 300 "$out/inspect.json"
python3 -m bf.cli quantize --bits 2 --out /tmp/shapes-2bit.bfq --force 2>&1 | tail -1
python3 -m bf.cli eval --model shipped --model "$out/shapes-sd-1.99bit.bfq" --model /tmp/shapes-2bit.bfq --reference shipped \
  --cfg 7.5 --seeds 2 --json "$out/eval.json" --grid "$out/eval.png" 2>&1 | tail -14
