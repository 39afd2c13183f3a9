#!/usr/bin/env bash
# GRPO on Qwen3-30B-A3B with verl 0.9.1 (Megatron actor, vLLM rollout), routing replay R3 and relibra:
# one node, 8 GPUs, EP 8. Same shape as verl's examples/router_replay/run_qwen30_a3b_megatron_vllm.sh.
# Switching an existing R3 pipeline on takes relibra's --config-path/--config-name, the
# actor_rollout_ref.relibra.* lines and the alltoall / no-permute-fusion dispatcher lines.
#
#   bash examples/grpo_qwen3_30b_a3b_relibra.sh                 # train
#   bash examples/grpo_qwen3_30b_a3b_relibra.sh --cfg job       # print the composed config, no GPU needed
# Extra arguments are Hydra overrides / flags passed to verl's main_ppo. NODES, GPUS_PER_NODE, EP,
# BATCH_SIZE and PPO_MINI_BATCH_SIZE set the cluster shape (grpo_qwen3_30b_a3b_relibra_4node.sh: EP 32).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON=python3; fi
fi
# relibra's Hydra config: verl's ppo_megatron_trainer + the actor_rollout_ref.relibra section (defaults)
RELIBRA_CONFIG_DIR="$("$PYTHON" -m relibra_verl.integration.plugin --config-dir)"

NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HF_MODEL_PATH=${HF_MODEL_PATH:-Qwen/Qwen3-30B-A3B}
TRAIN_DATA_PATH=${TRAIN_DATA_PATH:-$HOME/data/gsm8k/train.parquet}
TEST_DATA_PATH=${TEST_DATA_PATH:-$HOME/data/gsm8k/test.parquet}

export CUDA_DEVICE_MAX_CONNECTIONS=1 # Megatron communication/computation overlap
PP=1
TP=1
EP=${EP:-8}
ETP=1
VLLM_INFER_TP=4
offload=True
gpu_memory_utilization=0.6
bs=${BATCH_SIZE:-64}
n_resp=8
ppo_mini_batch_size=${PPO_MINI_BATCH_SIZE:-16}
max_prompt_length=1024
max_response_length=2048
actor_ppo_max_token_len=$(((max_prompt_length + max_response_length) * 2))
infer_ppo_max_token_len=$(((max_prompt_length + max_response_length) * 2))

# relibra: replicas per micro-batch inside each node, placement reordered after every optimizer step
RELIBRA_MODE=${RELIBRA_MODE:-both}
RELIBRA_REPLICA_SLOTS=${RELIBRA_REPLICA_SLOTS:-2}
# time-aware planning from this hardware profile (none: plan pair counts only)
RELIBRA_PROFILE=${RELIBRA_PROFILE:-h100-ib400}
# > 0: the reorder also weighs the busiest InfiniBand NIC (relibra-verl simulate --model qwen3-30b-a3b prints
# 0.902 on h100-ib400); it matters with several nodes, the 4-node script sets it
RELIBRA_INTER_NODE_SHARE=${RELIBRA_INTER_NODE_SHARE:-0.0}

exper_name=qwen3_30b_a3b_grpo_relibra_${RELIBRA_MODE}_N${NODES}_TP${TP}_EP${EP}

"$PYTHON" -m verl.trainer.main_ppo \
    --config-path="$RELIBRA_CONFIG_DIR" \
    --config-name=relibra_megatron_trainer \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    data.train_files="$TRAIN_DATA_PATH" \
    data.val_files="$TEST_DATA_PATH" \
    data.train_batch_size=$bs \
    data.max_prompt_length=$max_prompt_length \
    data.max_response_length=$max_response_length \
    data.filter_overlong_prompts=True \
    data.truncation='error' \
    actor_rollout_ref.model.path="$HF_MODEL_PATH" \
    actor_rollout_ref.model.use_fused_kernels=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=$ppo_mini_batch_size \
    actor_rollout_ref.actor.use_dynamic_bsz=True \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$actor_ppo_max_token_len \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=$PP \
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=$TP \
    actor_rollout_ref.actor.megatron.expert_model_parallel_size=$EP \
    actor_rollout_ref.actor.megatron.expert_tensor_parallel_size=$ETP \
    actor_rollout_ref.actor.megatron.param_offload=$offload \
    actor_rollout_ref.actor.megatron.optimizer_offload=$offload \
    actor_rollout_ref.actor.megatron.router_replay.mode=R3 \
    +actor_rollout_ref.actor.megatron.override_transformer_config.moe_router_dtype=fp32 \
    +actor_rollout_ref.actor.megatron.override_transformer_config.moe_token_dispatcher_type=alltoall \
    +actor_rollout_ref.actor.megatron.override_transformer_config.gradient_accumulation_fusion=True \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.mode=async \
    actor_rollout_ref.rollout.enable_rollout_routing_replay=True \
    actor_rollout_ref.rollout.tensor_model_parallel_size=$VLLM_INFER_TP \
    actor_rollout_ref.rollout.gpu_memory_utilization=$gpu_memory_utilization \
    actor_rollout_ref.rollout.n=$n_resp \
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True \
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=$infer_ppo_max_token_len \
    actor_rollout_ref.relibra.enable=True \
    actor_rollout_ref.relibra.mode=$RELIBRA_MODE \
    actor_rollout_ref.relibra.replica_slots=$RELIBRA_REPLICA_SLOTS \
    actor_rollout_ref.relibra.gpus_per_node=$GPUS_PER_NODE \
    actor_rollout_ref.relibra.reorder_every=1 \
    actor_rollout_ref.relibra.profile=$RELIBRA_PROFILE \
    actor_rollout_ref.relibra.inter_node_share=$RELIBRA_INTER_NODE_SHARE \
    trainer.critic_warmup=0 \
    trainer.logger='["console"]' \
    trainer.project_name=relibra_grpo_qwen3_30b_a3b \
    trainer.experiment_name="$exper_name" \
    trainer.nnodes=$NODES \
    trainer.n_gpus_per_node=$GPUS_PER_NODE \
    trainer.save_freq=-1 \
    trainer.test_freq=10 \
    trainer.total_epochs=1 \
    trainer.val_before_train=False \
    "$@"
