#!/usr/bin/env bash
# The real-trace and Qwen3 128-sequence configurations of bench/simulate_table.sh with every EPLB redundant
# copy priced at NVLink (h100-eplb-nvlink.json: eplb_copies_over_nvlink = 1), a bound that favours EPLB.
# About 10 minutes on one CPU core. JSON + text beside this script.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
out=bench/results/simulate/eplb_nvlink
export OMP_NUM_THREADS=1
sim() { name=$1; shift; .venv/bin/relibra-verl simulate --no-progress --replica-slots 2 --profile "$out/h100-eplb-nvlink.json" "$@" --json "$out/$name.json" > "$out/$name.txt"; }
source bench/table_configs.sh
small_configs
echo "results in $out"
