# The configurations of the README's tables, sourced by bench/simulate_table.sh, bench/simulate_passes.sh and
# bench/results/simulate/eplb_nvlink/run.sh. Each line calls the caller's `sim NAME ARGS...`.
real="--trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 2000 --steps 3"

# the bundled real traces (DeepSeek-V2-Lite shape) and Qwen3-30B-A3B with 128 sequences per step
small_configs() {
    sim ep8 $real --ep 8 --gpus-per-node 8 --tokens-per-rank 1024
    sim ep16 $real --ep 16 --gpus-per-node 8 --tokens-per-rank 1024
    sim ep16_4k $real --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
    sim ep16_small --trace bundled:esft_intent --trace bundled:esft_law --model deepseek-v2-lite --resample 200 \
        --steps 4 --ep 16 --gpus-per-node 8 --tokens-per-rank 4096
    sim qwen128 --synthetic --model qwen3-30b-a3b --seqs 128 --steps 2 --ep 32 --gpus-per-node 8 --tokens-per-rank 4096
}

# Qwen3-30B-A3B with 512 sequences, DeepSeek-V3 at EP 64; extra arguments go to the last run (e.g. --plot)
large_configs() {
    sim qwen512 --synthetic --model qwen3-30b-a3b --seqs 512 --steps 2 --ep 32 --gpus-per-node 8 --tokens-per-rank 4096
    sim v3_128 --synthetic --model deepseek-v3 --seqs 128 --steps 2 --ep 64 --gpus-per-node 8 --tokens-per-rank 4096
    sim v3_512 --synthetic --model deepseek-v3 --seqs 512 --steps 2 --ep 64 --gpus-per-node 8 --tokens-per-rank 4096 "$@"
}
