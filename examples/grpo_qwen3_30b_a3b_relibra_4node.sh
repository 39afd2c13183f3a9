#!/usr/bin/env bash
# GRPO on Qwen3-30B-A3B with verl 0.9.1 (Megatron actor, vLLM rollout), routing replay R3 and relibra:
# four nodes x 8 GPUs, EP 32 (replicas stay inside each node; reordering balances across nodes).
# Run from the Ray head node of a 4-node cluster (ray start on every node first). The one-node script with
# the 4-node shape: 4x the batch, EP 32.
#
#   bash examples/grpo_qwen3_30b_a3b_relibra_4node.sh                 # train
#   bash examples/grpo_qwen3_30b_a3b_relibra_4node.sh --cfg job       # print the composed config, no GPU needed
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NODES=${NODES:-4} EP=${EP:-32} BATCH_SIZE=${BATCH_SIZE:-256} PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-64}
# InfiniBand dominates the dispatch at EP 32 over 4 nodes: let the reorder weigh the busiest NIC
# (relibra-verl simulate --synthetic --model qwen3-30b-a3b --ep 32 ... prints inter_node_share=0.902)
export RELIBRA_INTER_NODE_SHARE=${RELIBRA_INTER_NODE_SHARE:-0.9}
exec bash "$HERE/grpo_qwen3_30b_a3b_relibra.sh" "$@"
