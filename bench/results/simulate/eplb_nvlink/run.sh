#!/usr/bin/env bash
# The real-trace and Qwen3 128-sequence configurations of bench/simulate_table.sh with every EPLB redundant
# copy priced at NVLink (h100-eplb-nvlink.json: eplb_copies_over_nvlink = 1), a bound that favours EPLB.
# About 10 minutes on one CPU core. JSON + text beside this script.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
out=bench/results/simulate/eplb_nvlink
export OMP_NUM_THREADS=1
sim() { name=$1; shift; .venv/bin/relibra-verl simulate --no-progress --replica-slots 2 --profile "$out/h100-eplb-nvlink.json" "$@" --json "$out/$name.json" > "$out/$name.txt"; }
real="--trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 2000 --steps 3"
sim ep8 $real --ep 8 --gpus-per-node 8 --tokens-per-rank 1024
sim ep16 $real --ep 16 --gpus-per-node 8 --tokens-per-rank 1024
sim ep16_4k $real --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
sim ep16_small --trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 200 --steps 4 \
    --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
sim qwen128 --synthetic --model qwen3-30b-a3b --seqs 128 --steps 2 --ep 32 --gpus-per-node 8 --tokens-per-rank 4096
echo "results in $out"
