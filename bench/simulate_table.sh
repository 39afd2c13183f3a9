#!/usr/bin/env bash
# The step-time table of the README: every strategy on the bundled real traces (EP 8 on one node, EP 16 on
# two; one small batch of one micro-batch per step) and on synthetic routing of qwen3-30b-a3b (EP 32, 4 x 8)
# and deepseek-v3 (EP 64, 8 x 8), h100-ib400, replica copies sent ahead, eplb-periodic at vLLM's defaults.
# About 20 minutes on one CPU core. JSON + text in ${1:-bench/results/simulate}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/simulate}
mkdir -p "$out"
export OMP_NUM_THREADS=1
sim() { name=$1; shift; .venv/bin/relibra-verl simulate --no-progress --replica-slots 2 "$@" --json "$out/$name.json" > "$out/$name.txt"; }
source bench/table_configs.sh
small_configs
large_configs --plot "$out/v3_512.png"
echo "results in $out"
