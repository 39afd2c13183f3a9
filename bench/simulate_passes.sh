#!/usr/bin/env bash
# The whole trainer step (update + old log-probs + reference forward) on the configurations of
# bench/simulate_table.sh: megatron, the EPLB baselines, relibra with its forward passes balanced and
# unbalanced, ideal; h100-ib400, copies sent ahead. JSON + text in ${1:-bench/results/simulate_passes}.
# Extra arguments go to every run (e.g. --logprob-tokens-per-rank 8192).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/simulate_passes}
shift || true
mkdir -p "$out"
export OMP_NUM_THREADS=1
sim() { name=$1; shift; .venv/bin/relibra-verl simulate --no-progress --replica-slots 2 \
    --strategies megatron,eplb-periodic,eplb-history,eplb-oracle,relibra,ideal --passes update,logprob,ref \
    "$@" "${EXTRA[@]}" --json "$out/$name.json" > "$out/$name.txt"; echo "$name done"; }
EXTRA=("$@")
real="--trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 2000 --steps 3"
sim ep8 $real --ep 8 --gpus-per-node 8 --tokens-per-rank 1024
sim ep16 $real --ep 16 --gpus-per-node 8 --tokens-per-rank 1024
sim ep16_4k $real --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
sim ep16_small --trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 200 --steps 4 \
    --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
sim qwen128 --synthetic --model qwen3-30b-a3b --seqs 128 --steps 2 --ep 32 --gpus-per-node 8 --tokens-per-rank 4096
sim qwen512 --synthetic --model qwen3-30b-a3b --seqs 512 --steps 2 --ep 32 --gpus-per-node 8 --tokens-per-rank 4096
sim v3_128 --synthetic --model deepseek-v3 --seqs 128 --steps 2 --ep 64 --gpus-per-node 8 --tokens-per-rank 4096
sim v3_512 --synthetic --model deepseek-v3 --seqs 512 --steps 2 --ep 64 --gpus-per-node 8 --tokens-per-rank 4096
echo "results in $out"
