"""relibra's plan for one batch: a placement (reorder.py) and per-micro-batch replicas (replicate.py).

The new placement must pay for its migration. Both placements, the new one and the one in force, get
their replicas, and each layer's critical path summed over the micro-batches (the replication objective
J, replicate.py) is weighed against the migration the new placement costs (_keep_or_move): a layer
keeps its placement where moving would not gain more than it costs, so the plan is never worse, under the
planner's cost, than keeping the placement (relibra-replicate) or than the new placement alone.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from relibra_verl.planner.reorder import ReorderConfig, plan_placement
from relibra_verl.planner.replicate import ReplicationConfig, plan_replicas
from relibra_verl.planner.types import BatchPlan, PlanError, Topology, identity_placement, invert_placement

__all__ = ["ReorderConfig", "ReplicationConfig", "plan_relibra", "plan_placement", "plan_replicas"]


def plan_relibra(counts: np.ndarray, topo: Topology, expert_at_home_prev: np.ndarray | None = None,
                 mode: str = "both", replication: ReplicationConfig = ReplicationConfig(),
                 reorder: ReorderConfig = ReorderConfig()) -> BatchPlan:
    """relibra's plan for one batch.

    counts: [M, L, G, E] pairs per (micro-batch, layer, source rank, expert).
    expert_at_home_prev: [L, E] the placement in force (None: Megatron's identity).
    mode: "both" | "reorder" (no replicas; the placement is weighed without them) | "replicate" (the
    placement in force).
    """
    counts = np.asarray(counts)
    if counts.ndim != 4:
        raise PlanError(f"counts must be [micro_batches, layers, ranks, experts], got shape {counts.shape}")
    M, L, G, E = counts.shape
    if (G, E) != (topo.G, topo.E):
        raise PlanError(f"counts are for G={G}, E={E} but the topology has G={topo.G}, E={topo.E}")
    if counts.size and counts.min() < 0:
        raise PlanError("counts must be nonnegative")
    if mode not in ("both", "reorder", "replicate"):
        raise PlanError(f"unknown mode {mode!r}; expected both, reorder or replicate")
    prev = identity_placement(topo, L) if expert_at_home_prev is None else np.asarray(expert_at_home_prev, dtype=np.int64)
    if prev.shape != (L, E):
        raise PlanError(f"previous placement has shape {prev.shape}, expected {(L, E)}")
    placement = prev
    # "reorder" weighs placements without replicas: what a plan without them computes
    weigh_topo = topo if mode == "both" else dataclasses.replace(topo, replica_slots=0)
    if mode in ("both", "reorder"):
        placement = plan_placement(counts, topo, prev, reorder)
        changed = np.flatnonzero((placement != prev).any(1))
        if len(changed):
            rep_e, rep_q, j_new = plan_replicas(counts, weigh_topo, placement, replication)
            kept_e, kept_q, j_keep = plan_replicas(counts[:, changed], weigh_topo, prev[changed], replication)
            keep = _keep_or_move(prev[changed], placement[changed], j_new[:, changed].sum(0), j_keep.sum(0), topo,
                                 reorder)
            placement = placement.copy()
            placement[changed[keep]] = prev[changed[keep]]
            rep_e[:, changed[keep]], rep_q[:, changed[keep]] = kept_e[:, keep], kept_q[:, keep]
        else:
            rep_e, rep_q, _ = plan_replicas(counts, weigh_topo, placement, replication)
    else:
        rep_e, rep_q, _ = plan_replicas(counts, topo, placement, replication)
    if mode == "reorder":
        rep_e = np.full((M, L, G, topo.R), -1, dtype=np.int64)
        rep_q = np.zeros((M, L, G, topo.R, G), dtype=np.int32)
    moved = (invert_placement(prev) // topo.S != invert_placement(placement) // topo.S).sum(1)
    return BatchPlan(topo, placement, rep_e, rep_q, moved)


def _keep_or_move(prev: np.ndarray, new: np.ndarray, j_new: np.ndarray, j_keep: np.ndarray, topo: Topology,
                  config: ReorderConfig) -> np.ndarray:
    """Which layers keep their placement: [K] bool for K layers whose new placement (new [K, E]) differs
    from prev [K, E], given each layer's J summed over micro-batches with the new placement (j_new [K]) and
    with the old one (j_keep [K]).

    Migration, as the step pays it: all layers move at once and the rank that receives most sets the time,
    each arrival costing config.migration_pairs (over InfiniBand, or over NVLink when the expert comes from
    its own node). Layers are reverted in the order of their gain (j_keep - j_new), the least first; of
    these K + 1 choices the cheapest (gains lost + migration) is kept, ties to keeping more."""
    K = len(prev)
    ib_cost, nvl_cost = config.migration_pairs
    nodes = np.asarray(topo.node_of_rank)
    old_rank, new_rank = invert_placement(prev) // topo.S, invert_placement(new) // topo.S      # [K, E]
    moved = old_rank != new_rank
    over_ib = moved & (nodes[old_rank] != nodes[new_rank])
    rows = np.repeat(np.arange(K), topo.E)
    ib = np.zeros((K, topo.G))
    nvl = np.zeros((K, topo.G))
    np.add.at(ib, (rows, new_rank.reshape(-1)), over_ib.reshape(-1))
    np.add.at(nvl, (rows, new_rank.reshape(-1)), (moved & ~over_ib).reshape(-1))
    gain = j_keep - j_new
    order = np.argsort(gain, kind="stable")
    # moving set after reverting the first k layers of order, k = 0..K
    ib_left = ib.sum(0) - np.concatenate([np.zeros((1, topo.G)), np.cumsum(ib[order], axis=0)])   # [K + 1, G]
    nvl_left = nvl.sum(0) - np.concatenate([np.zeros((1, topo.G)), np.cumsum(nvl[order], axis=0)])
    migration = np.maximum(ib_left * ib_cost, nvl_left * nvl_cost).max(1)
    gained = gain.sum() - np.concatenate([[0.0], np.cumsum(gain[order])])
    cost = migration - gained                                            # against keeping every layer
    best = len(cost) - 1 - int(np.argmin(cost[::-1]))                   # ties: revert more
    keep = np.zeros(K, dtype=bool)
    keep[order[:best]] = True
    return keep
