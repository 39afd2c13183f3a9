"""Routing-aware data placement in verl's driver: `actor_rollout_ref.relibra.data_placement: locality`.

verl 0.9.1's legacy trainer (RayPPOTrainer, `trainer.use_v1=false`) balances each batch over the actor's
DP ranks in `_balance_batch`: Karmarkar-Karp on attention workload, equal sequence counts, each rank's
share cut into mini-batches in order. The replacement runs verl's own balancing first (so its partition,
its mini-batches and its `global_seqlen/*` metrics are verl's), then, with the routes R3 brought back
from vLLM (`routed_experts`, [bsz, P + R, L_all, K] beside `attention_mask`), lets
relibra_verl.planner.locality move sequences between the ranks of each mini-batch so that their routed
pairs stay on their node: every mini-batch keeps its sequences (only which rank of it holds one changes,
which verl's loss normalisation over the global token count does not see), every rank its count, the
busiest rank its workload within tolerance. `global_seqlen/balanced_*` then describe the placement used;
`relibra/inter_node_fraction`, `relibra/inter_node_fraction_verl`, `relibra/data_placement_fell_back`
and `relibra/data_placement_ms` are added.

Experts' nodes: with relibra's reorder off, experts stay in Megatron's layout and the planner moves only
the data. With it on, the planner also chooses every expert's node and hands it to the workers with the
batch (`meta_info["relibra_node_of_expert"]`, [L, E']); the workers do not apply that hint yet, so until
they do the figures describe the planned placement, not the one the reorder runs.

Assumptions checked at run time (else verl's placement, with the reason logged once): the DP ranks are the
expert-parallel ranks in order (tensor, pipeline and context parallel size 1), `gpus_per_node` divides the
EP size, the batch carries `routed_experts`. Dense layers (routes all 0) are left out; E' is the largest
routed expert id + 1, rounded up to a multiple of the node count.
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("relibra_verl")

PLACEMENTS = ("verl", "locality")


def patch_ray_trainer(module) -> list[str]:
    """Wrap RayPPOTrainer._balance_batch of verl.trainer.ppo.ray_trainer (idempotent)."""
    cls = module.RayPPOTrainer
    if getattr(cls, "_relibra_data_placement", False):
        return []
    native = cls._balance_batch

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        result = native(self, batch, metrics=metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        try:
            place_by_routes(self, batch, metrics, logging_prefix)
        except Exception as exc:  # verl's placement stands
            _once(f"relibra-verl: routing-aware data placement skipped, verl's placement kept ({type(exc).__name__}: {exc})")
        return result

    _balance_batch.__wrapped__ = native
    cls._balance_batch = _balance_batch
    cls._relibra_data_placement = True
    return ["RayPPOTrainer._balance_batch"]


_said: set = set()


def _once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        logger.warning(msg)


def place_by_routes(trainer, batch, metrics: dict, logging_prefix: str = "global_seqlen") -> None:
    """After verl's _balance_batch: move sequences between the ranks of their mini-batch (batch.reorder, in
    place) when `data_placement: locality`; add the metrics."""
    from relibra_verl.config import from_actor_rollout_ref

    cfg = from_actor_rollout_ref(trainer.config.actor_rollout_ref)
    if cfg.data_placement != "locality":
        return
    reason = _unsupported(trainer, batch)
    if reason:
        _once(f"relibra-verl: routing-aware data placement off, verl's placement kept: {reason}")
        metrics["relibra/data_placement_fell_back"] = 1.0
        return
    import torch
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    from relibra_verl.planner.locality import plan_locality

    mask = batch.batch["attention_mask"]
    bsz = mask.shape[0]
    dp = trainer._get_dp_size(trainer.actor_rollout_wg, "actor")
    per_rank = bsz // dp
    actor = trainer.config.actor_rollout_ref.actor
    mini = int(actor.ppo_mini_batch_size) * int(trainer.config.actor_rollout_ref.rollout.n) // dp
    position = np.arange(bsz) % per_rank
    verl_rank = np.arange(bsz) // per_rank                    # verl's dispatch: contiguous equal chunks
    minibatch = position // max(mini, 1)
    ep = int(actor.megatron.expert_model_parallel_size)
    node_of_rank = (np.arange(dp) % ep) // cfg.gpus_per_node
    usage, seq_lens = usage_from_batch(batch, int(node_of_rank.max()) + 1)
    prev = getattr(trainer, "_relibra_node_of_expert", None)
    move_experts = cfg.enable and cfg.reorders
    if not move_experts:
        prev = None
    placed = plan_locality(usage, seq_lens, node_of_rank, verl_rank, minibatch=minibatch,
                           prev_node_of_expert=prev if prev is not None and prev.shape == usage.shape[1:] else None,
                           move_experts=move_experts)
    metrics.update(placed.metrics())
    if placed.fell_back:
        batch.meta_info.pop("relibra_node_of_expert", None)
        return
    # each rank's sequences in mini-batch order, then verl's order: the worker's cut into mini-batches
    # finds verl's mini-batches
    order = np.lexsort((np.arange(bsz), minibatch, placed.rank_of_seq))
    batch.reorder(torch.as_tensor(order))
    seqlen = mask.view(bsz, -1).sum(-1).tolist()
    partitions = [order[r * per_rank:(r + 1) * per_rank].tolist() for r in range(dp)]
    # verl's balanced_* describe the partition used; its min / max (the batch before balancing) stand
    stats = log_seqlen_unbalance(seqlen_list=seqlen, partitions=partitions, prefix=logging_prefix)
    metrics.update({k: v for k, v in stats.items() if "/balanced_" in k})
    if move_experts:
        trainer._relibra_node_of_expert = placed.node_of_expert
        batch.meta_info["relibra_node_of_expert"] = placed.node_of_expert


def _unsupported(trainer, batch) -> str:
    if "routed_experts" not in batch.batch.keys():
        return "the batch has no routed_experts (turn on R3 routing replay)"
    if getattr(trainer, "use_prefix_grouper", False):
        return "PrefixGrouper keeps each prompt's responses on one rank"
    actor = trainer.config.actor_rollout_ref.actor
    meg = actor.get("megatron", None)
    if meg is None:
        return "not a Megatron actor"
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        if int(meg.get(key, 1) or 1) != 1:
            return f"{key} = {meg.get(key)} (DP ranks are taken to be the EP ranks in order)"
    if actor.get("shuffle", False):
        return "actor.shuffle: each rank shuffles its rows before cutting mini-batches, so they depend on the rank"
    return ""


def usage_from_batch(batch, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence usage [B, L, E'] and lengths [B] of a legacy DataProto: `routed_experts` [B, T, L_all, K]
    over the tokens `attention_mask` [B, T] marks; dense layers (every route 0) dropped; E' the largest id
    + 1 rounded up to a multiple of num_nodes."""
    mask = batch.batch["attention_mask"].bool().cpu().numpy()
    routes = batch.batch["routed_experts"].cpu().numpy().astype(np.int64)   # [B, T, L_all, K]
    moe = (routes[mask] != 0).any(axis=(0, 2))                               # [L_all]
    routes = routes[:, :, moe]
    E = -(-(int(routes.max(initial=0)) + 1) // num_nodes) * num_nodes
    B, T, L, K = routes.shape
    seq = np.broadcast_to(np.arange(B)[:, None, None, None], routes.shape)
    layer = np.broadcast_to(np.arange(L)[None, None, :, None], routes.shape)
    valid = np.broadcast_to(mask[:, :, None, None], routes.shape) & (routes >= 0)
    flat = (seq[valid] * L + layer[valid]) * E + routes[valid]
    usage = np.bincount(flat, minlength=B * L * E).reshape(B, L, E)
    return usage, mask.sum(1)
