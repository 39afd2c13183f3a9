"""Routing-aware data placement in verl's driver: `actor_rollout_ref.relibra.data_placement: locality`.

Both of verl 0.9.1's trainers balance each batch over the actor's DP ranks in `_balance_batch`:
Karmarkar-Karp on attention workload, equal sequence counts, rank r taking the r-th contiguous chunk
(verl's dispatch), which the worker cuts into mini-batches in order. The legacy trainer (RayPPOTrainer,
`trainer.use_v1=false`) holds the batch in a DataProto with the routes R3 brought back from vLLM
(`routed_experts`, [bsz, P + R, L_all, K] beside `attention_mask`); the V1 trainer (PPOTrainer of
verl.trainer.ppo.v1, the default) holds a KVBatchMeta (keys and tags; the data stays in TransferQueue,
where the agent loop put every sample's `routed_experts`, [P + R, L_all, K] unpadded), so there the
routes are read from TransferQueue, `routed_experts` only, a chunk of sequences at a time (what verl's own
rollout MoE metrics read). The replacement runs verl's own balancing first (so its partition, its
mini-batches and its `global_seqlen/*` metrics are verl's), then lets relibra_verl.planner.locality move
sequences between the ranks of each mini-batch so that their routed pairs stay on their node: every
mini-batch keeps its sequences (only which rank of it holds one changes, which verl's loss normalisation
over the global token count does not see), every rank its count, the busiest rank its workload within
tolerance. `global_seqlen/balanced_*` then describe the placement used;
`relibra/inter_node_fraction`, `relibra/inter_node_fraction_verl`, `relibra/data_placement_fell_back`
and `relibra/data_placement_ms` are added.

Experts' nodes: with relibra's reorder off, experts stay in Megatron's layout and the planner moves only
the data. With it on, the planner also chooses every expert's node and hands it to the workers with the
batch (legacy `meta_info`, V1 `extra_info`: `relibra_node_of_expert`, [L, E]); the workers' reorder
packs experts towards those nodes (relibra_verl.integration.trainer, plan_relibra's preferred_node).

Assumptions checked at run time (else verl's placement, counted in `relibra/data_placement_fell_back`, the
reason logged once): the DP ranks are the expert-parallel ranks in order (tensor, pipeline and context
parallel size 1), no per-rank shuffle of mini-batches (`actor.shuffle`), no PrefixGrouper, the batch
carries `routed_experts`. Dense layers (routes all 0) are left out; E is the model's expert count (verl's
infer_rollout_moe_num_experts), else the largest routed expert id + 1 rounded up to a multiple of the node
count. V1's padding samples (tag `is_padding`) count no pairs.
"""
from __future__ import annotations

import inspect
import logging

import numpy as np

logger = logging.getLogger("relibra_verl")

PLACEMENTS = ("verl", "locality")
HINT_KEY = "relibra_node_of_expert"      # [L, E] node of every expert, in the batch's meta_info / extra_info
V1_READ_CHUNK = 256                       # sequences per TransferQueue read of the routes (bounds driver memory)
_SIGNATURE = ("self", "batch", "metrics", "logging_prefix", "keep_minibatch")


def _wrap_balance_batch(cls, place) -> None:
    native = cls._balance_batch
    params = tuple(inspect.signature(native).parameters)
    if params != _SIGNATURE:
        raise TypeError(f"{cls.__name__}._balance_batch{params} is not verl 0.9.1's {_SIGNATURE}")

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        result = native(self, batch, metrics=metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        placed = batch if result is None else result          # legacy: in place; V1: the (padded) batch returned
        try:
            place(self, placed, metrics, logging_prefix)
        except Exception as exc:  # verl's placement stands, counted and said
            _fell_back(placed, metrics, f"routing-aware data placement failed ({type(exc).__name__}: {exc})")
        return result

    _balance_batch.__wrapped__ = native
    cls._balance_batch = _balance_batch
    cls._relibra_data_placement = True


def patch_ray_trainer(module) -> list[str]:
    """Wrap RayPPOTrainer._balance_batch of verl.trainer.ppo.ray_trainer (the legacy trainer; idempotent)."""
    if getattr(module.RayPPOTrainer, "_relibra_data_placement", False):
        return []
    _wrap_balance_batch(module.RayPPOTrainer, place_by_routes)
    return ["RayPPOTrainer._balance_batch"]


def patch_v1_trainer(module) -> list[str]:
    """Wrap PPOTrainer._balance_batch of verl.trainer.ppo.v1.trainer_base (the V1 trainer; idempotent)."""
    if getattr(module.PPOTrainer, "_relibra_data_placement", False):
        return []
    _wrap_balance_batch(module.PPOTrainer, place_by_routes_v1)
    return ["PPOTrainer._balance_batch (v1)"]


_said: set = set()


def _once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        logger.warning(msg)


def _fell_back(batch, metrics: dict, reason: str) -> None:
    _once(f"relibra-verl: verl's data placement kept: {reason}")
    metrics["relibra/data_placement_fell_back"] = 1.0
    _meta(batch).pop(HINT_KEY, None)


def _meta(batch) -> dict:
    """The dict verl hands to every worker call with the batch: DataProto.meta_info, KVBatchMeta.extra_info."""
    meta = getattr(batch, "meta_info", None)
    if meta is None:
        meta = batch.extra_info
    return meta


def _locality_on(trainer):
    from relibra_verl.config import from_actor_rollout_ref

    cfg = from_actor_rollout_ref(trainer.config.actor_rollout_ref)
    return cfg if cfg.data_placement == "locality" else None


def place_by_routes(trainer, batch, metrics: dict, logging_prefix: str = "global_seqlen") -> None:
    """Legacy trainer, after verl's _balance_batch: move sequences between the ranks of their mini-batch
    (DataProto.reorder, in place) when `data_placement: locality`; add the metrics."""
    cfg = _locality_on(trainer)
    if cfg is None:
        return
    reason = ("the batch has no routed_experts (turn on R3 routing replay)"
              if "routed_experts" not in batch.batch.keys() else _unsupported(trainer))
    if reason:
        return _fell_back(batch, metrics, reason)
    import torch

    mask = batch.batch["attention_mask"].bool().cpu().numpy()
    routes = batch.batch["routed_experts"].cpu().numpy()
    dp = trainer._get_dp_size(trainer.actor_rollout_wg, "actor")
    seq_lens = mask.sum(1)
    rows = [sequence_usage(routes[b][mask[b]]) for b in range(len(mask))]
    order = _place(trainer, cfg, rows, seq_lens, dp, batch, metrics, logging_prefix)
    if order is not None:
        batch.reorder(torch.as_tensor(order))


def place_by_routes_v1(trainer, batch, metrics: dict, logging_prefix: str = "global_seqlen") -> None:
    """V1 trainer, after verl's _balance_batch: the same on a KVBatchMeta (KVBatchMeta.reorder, in place), the
    routes read from TransferQueue."""
    cfg = _locality_on(trainer)
    if cfg is None:
        return
    reason = _unsupported(trainer)
    if reason:
        return _fell_back(batch, metrics, reason)
    import transfer_queue as tq

    dp = max(trainer.actor_rollout_wg._dispatch_info["actor"]) + 1     # filled by verl's _balance_batch
    seq_lens = np.array([int(tag["seq_len"]) for tag in batch.tags], dtype=np.int64)
    padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
    rows = []                                  # per sequence [L_all, e]: the routes are not kept
    for lo in range(0, len(batch), V1_READ_CHUNK):
        keys = batch.keys[lo:lo + V1_READ_CHUNK]
        try:
            got = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["routed_experts"])
        except ValueError as exc:
            if "routed_experts" not in str(exc):
                raise
            return _fell_back(batch, metrics, "the batch has no routed_experts in TransferQueue (turn on R3 "
                                              f"routing replay): {exc}")
        field = got["routed_experts"]
        for j, r in enumerate(field.unbind(0) if getattr(field, "is_nested", False) else field):
            r = r.cpu().numpy()[:seq_lens[lo + j]]
            rows.append(sequence_usage(r[:0] if padding[lo + j] else r))  # padding samples: no pairs
    order = _place(trainer, cfg, rows, seq_lens, dp, batch, metrics, logging_prefix)
    if order is not None:
        batch.reorder(order.tolist())


def _place(trainer, cfg, rows: list, seq_lens: np.ndarray, dp: int, batch, metrics: dict,
           logging_prefix: str) -> np.ndarray | None:
    """Plan the placement of a batch balanced by verl (rank r holds its r-th contiguous chunk). rows: [B]
    per sequence its sequence_usage [L_all, e_b]; seq_lens [B]. Puts the metrics and the expert-node hint; returns the
    order to reorder the batch by (None: verl's placement kept)."""
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    from relibra_verl.planner.locality import plan_locality

    bsz = len(seq_lens)
    per_rank = bsz // dp
    ref = trainer.config.actor_rollout_ref
    n = int(ref.rollout.n)
    position = np.arange(bsz) % per_rank
    verl_rank = np.arange(bsz) // per_rank                    # verl's dispatch: contiguous equal chunks
    # every sequence stays in its mini-batch of each model that cuts this batch (the actor's, the critic's)
    minibatch = position // max(int(ref.actor.ppo_mini_batch_size) * n // dp, 1)
    if getattr(trainer, "use_critic", False):
        critic = position // max(int(trainer.config.critic.ppo_mini_batch_size) * n // dp, 1)
        minibatch = np.unique(np.stack([minibatch, critic], 1), axis=0, return_inverse=True)[1].reshape(-1)
    ep = int(ref.actor.megatron.expert_model_parallel_size)
    node_of_rank = (np.arange(dp) % ep) // cfg.gpus_per_node
    usage = usage_from_sequences(rows, int(node_of_rank.max()) + 1, _num_experts(trainer))
    move_experts = cfg.enable and cfg.reorders
    prev = getattr(trainer, "_relibra_node_of_expert", None) if move_experts else None
    placed = plan_locality(usage, seq_lens, node_of_rank, verl_rank, minibatch=minibatch,
                           prev_node_of_expert=prev if prev is not None and prev.shape == usage.shape[1:] else None,
                           move_experts=move_experts)
    metrics.update(placed.metrics())
    if placed.fell_back:
        _once(f"relibra-verl: verl's data placement kept this step ({placed.reason}); "
              "counted in relibra/data_placement_fell_back")
        _meta(batch).pop(HINT_KEY, None)
        return None
    # each rank's sequences in mini-batch order, then verl's order: the worker's cut into mini-batches
    # finds verl's mini-batches
    order = np.lexsort((np.arange(bsz), minibatch, placed.rank_of_seq))
    partitions = [order[r * per_rank:(r + 1) * per_rank].tolist() for r in range(dp)]
    # verl's balanced_* describe the partition used; its min / max (the batch before balancing) stand
    stats = log_seqlen_unbalance(seqlen_list=[int(x) for x in seq_lens], partitions=partitions, prefix=logging_prefix)
    metrics.update({k: v for k, v in stats.items() if "/balanced_" in k})
    if move_experts:
        trainer._relibra_node_of_expert = placed.node_of_expert
        _meta(batch)[HINT_KEY] = placed.node_of_expert
    return order


def _unsupported(trainer) -> str:
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


def _num_experts(trainer) -> int | None:
    """The model's routed experts per layer (verl's own inference from the model config; once per trainer),
    None where verl cannot tell."""
    if not hasattr(trainer, "_relibra_num_experts"):
        try:
            from verl.trainer.ppo.metric_utils import infer_rollout_moe_num_experts

            trainer._relibra_num_experts = infer_rollout_moe_num_experts(trainer.config.actor_rollout_ref.model)
        except Exception as exc:
            _once(f"relibra-verl: the model's expert count is unreadable ({type(exc).__name__}: {exc}); "
                  "taken from the routes")
            trainer._relibra_num_experts = None
    return trainer._relibra_num_experts


def sequence_usage(routes: np.ndarray) -> np.ndarray:
    """One sequence's routes [T, L_all, K] (valid tokens only) -> its pairs per layer and expert [L_all, max id + 1]."""
    from relibra_verl.planner.locality import count_routed_pairs

    return count_routed_pairs(routes)               # checks the shape and the ids (PlanError, a ValueError)


def usage_from_sequences(rows: list, num_nodes: int, num_experts: int | None = None) -> np.ndarray:
    """Per-sequence usage [B, L, E] from every sequence's sequence_usage [L_all, e_b]: dense layers (every
    route 0) dropped; E = num_experts (None: the largest id + 1), rounded up to a multiple of num_nodes."""
    L_all = max((r.shape[0] for r in rows), default=0)
    top = max((r.shape[1] for r in rows), default=1)
    if num_experts is not None and top > num_experts:
        raise ValueError(f"routed_experts holds expert id {top - 1} >= the model's {num_experts} experts")
    E = -(-max(top, num_experts or 0) // num_nodes) * num_nodes
    usage = np.zeros((len(rows), L_all, E), dtype=np.int32)
    for b, r in enumerate(rows):
        usage[b, :r.shape[0], :r.shape[1]] = r
    moe = usage[:, :, 1:].any(axis=(0, 2))                                       # [L_all]
    return usage[:, moe]
