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
real="--trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 2000 --steps 3"
sim ep8 $real --ep 8 --gpus-per-node 8 --tokens-per-rank 1024
sim ep16 $real --ep 16 --gpus-per-node 8 --tokens-per-rank 1024
sim ep16_4k $real --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
sim ep16_small --trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 200 --steps 4 \
    --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
sim qwen128 --synthetic --model qwen3-30b-a3b --seqs 128 --steps 2 --ep 32 --gpus-per-node 8 --tokens-per-rank 4096
sim qwen512 --synthetic --model qwen3-30b-a3b --seqs 512 --steps 2 --ep 32 --gpus-per-node 8 --tokens-per-rank 4096
sim v3_128 --synthetic --model deepseek-v3 --seqs 128 --steps 2 --ep 64 --gpus-per-node 8 --tokens-per-rank 4096
sim v3_512 --synthetic --model deepseek-v3 --seqs 512 --steps 2 --ep 64 --gpus-per-node 8 --tokens-per-rank 4096 --plot "$out/v3_512.png"
echo "results in $out"
