"""relibra's plan for one batch: a placement (reorder.py) and per-micro-batch replicas (replicate.py).

The new placement must pay for its migration. Both placements, the new one and the one in force, get
their replicas, and the critical paths they lead to, summed over the batch's micro-batches and layers (the
replication objective J, replicate.py), are weighed with the new placement's migration (migration_cost):
the batch keeps its placement unless moving gains more than it costs, so the plan is never worse, under
the planner's cost, than keeping the placement with replicas, nor than the new placement with them. The
migration is paid once and the gain counted over ReorderConfig.migration_horizon batches (a placement
outlasts the batch it is planned on: the trainer applies it to the next one, later plans start from it). The
choice is the batch's, not each layer's: J is the planner's estimate of a layer's time, and layer by layer
the choice would follow its noise. Where the placement in force cannot do better than moving even with
perfect replication (replica_lower_bound), its replicas are not planned at all.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from relibra_verl.planner.reorder import ReorderConfig, plan_placement
from relibra_verl.planner.replicate import ReplicationConfig, plan_replicas, replica_lower_bound
from relibra_verl.planner.types import BatchPlan, PlanError, Topology, identity_placement, invert_placement

__all__ = ["ReorderConfig", "ReplicationConfig", "plan_relibra", "plan_placement", "plan_replicas"]


def plan_relibra(counts: np.ndarray, topo: Topology, expert_at_home_prev: np.ndarray | None = None,
                 mode: str = "both", replication: ReplicationConfig = ReplicationConfig(),
                 reorder: ReorderConfig = ReorderConfig(), preferred_node: np.ndarray | None = None,
                 with_replicas: bool = True) -> BatchPlan:
    """relibra's plan for one batch.

    counts: [M, L, G, E] pairs per (micro-batch, layer, source rank, expert).
    expert_at_home_prev: [L, E] the placement in force (None: Megatron's identity).
    mode: "both" | "reorder" (no replicas; the placement is weighed without them) | "replicate" (the
    placement in force).
    preferred_node: [L, E] experts' nodes chosen with the data (reorder.plan_placement), or None.
    with_replicas False: the placement only, chosen as with them (the replicas are planned and weighed, their
    quotas not written), the plan's replicas empty as in mode "reorder": what the next placement needs.
    """
    counts = np.asarray(counts)
    if not reorder.migration_horizon > 0:
        raise PlanError(f"ReorderConfig.migration_horizon must be > 0 batches, got {reorder.migration_horizon}")
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
        placement = plan_placement(counts, topo, prev, reorder, preferred_node=preferred_node)
        changed = np.flatnonzero((placement != prev).any(1))
        if len(changed):
            rep_e, rep_q, j_new = plan_replicas(counts, weigh_topo, placement, replication, quotas=with_replicas)
            # per batch: the gain over the horizon against the migration, paid once
            migration = migration_cost(prev[changed], placement[changed], topo, reorder) / reorder.migration_horizon
            moving = float(j_new[:, changed].sum()) + migration
            # keeping cannot end below its lower bound: where that already costs more, the plan moves unweighed
            if replica_lower_bound(counts, weigh_topo, prev[changed], replication, layers=changed).sum() < moving:
                kept_e, kept_q, j_keep = plan_replicas(counts, weigh_topo, prev[changed], replication, layers=changed,
                                                       quotas=with_replicas)
                if float(j_keep.sum()) < moving:
                    placement = prev
                    if with_replicas and len(changed) == L:
                        rep_e, rep_q = kept_e, kept_q
                    elif with_replicas:   # without, both are untouched zeros: a copy would fault their pages in
                        rep_e[:, changed], rep_q[:, changed] = kept_e, kept_q
                del kept_e, kept_q                                       # the quotas are M x L x G x R x G
        elif mode == "both" and with_replicas:
            rep_e, rep_q, _ = plan_replicas(counts, weigh_topo, placement, replication)
    elif with_replicas:
        rep_e, rep_q, _ = plan_replicas(counts, topo, placement, replication)
    if mode == "reorder" or not with_replicas:
        rep_e = np.full((M, L, G, topo.R), -1, dtype=np.int64)
        rep_q = np.zeros((M, L, G, topo.R, G), dtype=np.int32)
    moved = (invert_placement(prev) // topo.S != invert_placement(placement) // topo.S).sum(1)
    return BatchPlan(topo, placement, rep_e, rep_q, moved)


def migration_cost(prev: np.ndarray, new: np.ndarray, topo: Topology, config: ReorderConfig) -> float:
    """What moving from placement prev [K, E] to new [K, E] costs the step, in units of J: all layers move at
    once and the rank that receives most sets the time, each arrival costing config.migration_pairs (over
    InfiniBand, or over NVLink when the expert comes from its own node)."""
    ib_cost, nvl_cost = config.migration_pairs
    nodes = np.asarray(topo.node_of_rank)
    old_rank, new_rank = invert_placement(prev) // topo.S, invert_placement(new) // topo.S      # [K, E]
    moved = old_rank != new_rank
    over_ib = moved & (nodes[old_rank] != nodes[new_rank])
    ib = np.bincount(new_rank[over_ib], minlength=topo.G)                  # arrivals per rank
    nvl = np.bincount(new_rank[moved & ~over_ib], minlength=topo.G)
    return float(np.maximum(ib * ib_cost, nvl * nvl_cost).max())
