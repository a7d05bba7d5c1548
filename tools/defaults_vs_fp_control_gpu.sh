#!/usr/bin/env bash
# The shipped 1.99-bit model (bf train at its defaults: batch 64, lr 1e-4, 2000 + 1000 steps, 20000 shapes images)
# against the FP model and the same-budget FP control (bf train --fp-control at the same defaults: Stage II's 1000
# steps; its Stage I is the identity), on all four shapes-test splits at CFG 3.5 and 7.5 with paired 95% intervals;
# then a small grid of the three models' images.
# Usage (repository root, on a GPU machine): tools/defaults_vs_fp_control_gpu.sh OUT [PROMPTS [SEEDS]]
# OUT receives control.txt, eval.json, eval.txt, grid.png (and control/, the control model).
set -uo pipefail
out=$(realpath "$1"); prompts=${2:-shapes-test:150}; seeds=${3:-2}; repo=$(pwd)
mkdir -p "$out"
source tools/device_env.sh
cd /tmp || exit 1
export BF_PROGRESS_SECONDS=20
python3 -m bf.cli train --fp-control --cuda-graph --work /tmp/control.work --out "$out/control" 2>&1 | tee "$out/control.txt" | tail -6
cp /tmp/control.work/log.csv "$out/control_log.csv" 2>/dev/null
python3 -m bf.cli eval --model shipped-1.99bit --model "$out/control" --model shipped --reference shipped --prompts "$prompts" \
  --seeds "$seeds" --cfg 3.5,7.5 --batch-size 128 --json "$out/eval.json" 2>&1 | tee "$out/eval.txt" | tail -40
python3 -m bf.cli eval --model shipped-1.99bit --model "$out/control" --reference shipped --limit 3 --cfg 3.5,7.5 \
  --batch-size 64 --grid "$out/grid.png" > /dev/null 2>&1 || echo "grid failed"
