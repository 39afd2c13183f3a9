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
source bench/table_configs.sh
small_configs
large_configs
echo "results in $out"
