"""The strategies compared by the simulator, behind one function and a registry.

Every strategy turns one batch's loads into a `StrategyResult`: where each routed pair is computed and
what that costs in traffic and weight movement, so imbalance and step time can be compared on the same
data with the same cost model.

  megatron           identity placement, no replicas
  eplb-history       DeepSeek EPLB on the previous batch's loads, G*R redundant experts
  eplb-periodic      DeepSeek EPLB on a window of past loads, G*R redundant experts (the caller decides
                     when to rebalance: relibra_verl.sim.baselines)
  eplb-oracle        DeepSeek EPLB on this batch's loads, G*R redundant experts
  relibra-reorder    relibra's per-batch placement, no replicas
  relibra-replicate  identity placement, relibra's per-micro-batch replicas
  relibra            both
  relibra-locality   relibra on data co-placed with its experts (relibra_verl.planner.locality): its
                     batches are split differently, relibra plans from the experts' nodes chosen with it
  ideal              every rank computes the mean load, traffic spread evenly
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from relibra_verl.planner.baselines import choose_homes, moved_homes, physical_to_logical, redundant_per_rank
from relibra_verl.planner.eplb import rebalance_experts
from relibra_verl.planner.relibra import ReorderConfig, ReplicationConfig, plan_relibra
from relibra_verl.planner.types import BatchPlan, PlanError, Topology, identity_placement

STRATEGIES = ("megatron", "eplb-periodic", "eplb-history", "eplb-oracle", "relibra-reorder", "relibra-replicate", "relibra",
              "relibra-locality", "ideal")
# what simulate runs unless told: relibra-locality needs per-sequence routes (a trace) and plans the data too
DEFAULT_STRATEGIES = tuple(s for s in STRATEGIES if s != "relibra-locality")


@dataclasses.dataclass
class StrategyResult:
    """What a strategy does with one batch.

    rank_tokens:   [M, L, G] routed pairs computed on each rank.
    traffic:       [M, L, G_src, G_dst] pairs sent from the rank holding the token to the computing rank
                   (diagonal = pairs that stay on their GPU).
    replicas:      [M, L, G] replica expert weights each rank receives for this micro-batch.
    redundant:     [L, G] EPLB redundant copies held for the whole batch (their grads are reduced once).
    moved_experts: [L] experts (EPLB: home slots) whose content changed since the previous batch.
    placement:     [L, P] the expert in each home slot; EPLB: its physical slots, encoded as in
                   relibra_verl.planner.baselines (home e, redundant -(e + 2)); carried into the next batch.
    plan_ms:       planner wall time for the batch.
    plan:          the BatchPlan (relibra strategies), else None.
    data:          relibra-locality: the DataPlacement of the batch, else None.
    calls:         [M, L, G] expert GEMM calls of each rank: its copies (home, replica, redundant) that
                   compute at least one pair; None: every copy counts (the ideal's S per rank).
    """

    name: str
    rank_tokens: np.ndarray
    traffic: np.ndarray
    replicas: np.ndarray
    redundant: np.ndarray
    moved_experts: np.ndarray
    placement: np.ndarray
    plan_ms: float
    plan: BatchPlan | None = None
    calls: np.ndarray | None = None
    data: object = None

    def inter_node_pairs(self, node_of_rank) -> tuple[float, float]:
        """(routed pairs that cross nodes, all routed pairs) in `traffic`."""
        nodes = np.asarray(node_of_rank)
        traffic = np.asarray(self.traffic, dtype=np.float64)
        return float((traffic * (nodes[:, None] != nodes[None, :])).sum()), float(traffic.sum())

    def imbalance(self) -> np.ndarray:
        """[M, L] max over ranks / mean over ranks (1.0 for empty pairs)."""
        mean = self.rank_tokens.mean(-1)
        peak = self.rank_tokens.max(-1)
        return np.where(mean > 0, peak / np.where(mean > 0, mean, 1), 1.0)


def plan_outcome(plan: BatchPlan, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a relibra plan computes every pair.

    counts: [M, L, G, E].  Returns rank_tokens [M, L, G], traffic [M, L, G_src, G_dst] and calls
    [M, L, G] (each rank's copies that compute at least one pair).
    """
    t = plan.topo
    M, L, G, E = counts.shape
    home_rank = plan.home_of_expert() // t.S                                  # [L, E]
    onehot = np.zeros((L, E, G))
    np.put_along_axis(onehot, home_rank[:, :, None], 1.0, axis=2)
    traffic = np.einsum("mlre,leg->mlrg", counts.astype(np.float64), onehot)
    at_home = counts.sum(axis=2).astype(np.int64)                               # [M, L, E] pairs the home computes
    rep = plan.replica_expert
    m_i, l_i, r_i, k_i = np.nonzero(rep >= 0)
    calls = np.zeros((M, L, G), dtype=np.int64)
    if len(m_i):
        q = plan.replica_quota[m_i, l_i, r_i, k_i].astype(np.float64)        # [K, G_src]
        e_i = rep[m_i, l_i, r_i, k_i]
        h_i = home_rank[l_i, e_i]
        src = np.arange(G)
        np.add.at(traffic, (m_i[:, None], l_i[:, None], src[None, :], h_i[:, None]), -q)
        np.add.at(traffic, (m_i[:, None], l_i[:, None], src[None, :], r_i[:, None]), q)
        np.subtract.at(at_home, (m_i, l_i, e_i), q.sum(1).astype(np.int64))
        np.add.at(calls, (m_i, l_i, r_i), (q.sum(1) > 0).astype(np.int64))
    calls += np.einsum("mle,leg->mlg", (at_home > 0).astype(np.float64), onehot).astype(np.int64)   # busy home copies
    return traffic.sum(2), traffic, calls


def _relibra(counts, topo, mode, prev, replication, reorder, preferred_node=None) -> StrategyResult:
    t0 = time.perf_counter()
    plan = plan_relibra(counts, topo, prev, mode=mode, replication=replication, reorder=reorder,
                        preferred_node=preferred_node)
    ms = (time.perf_counter() - t0) * 1e3
    rank_tokens, traffic, calls = plan_outcome(plan, counts)
    replicas = (plan.replica_expert >= 0).sum(-1)
    M, L, G, _ = counts.shape
    return StrategyResult("", rank_tokens, traffic, replicas, np.zeros((L, G), np.int64), plan.moved_experts,
                          plan.expert_at_home, ms, plan, calls)


def _eplb(counts, topo, weight, prev_placement, num_groups) -> StrategyResult:
    E = counts.shape[-1]
    t0 = time.perf_counter()
    phy2log, _, _ = rebalance_experts(weight, E + topo.G * topo.R, num_groups, topo.num_nodes, topo.G)
    ms = (time.perf_counter() - t0) * 1e3
    return eplb_result(counts, topo, choose_homes(phy2log, topo, prev_placement), prev_placement, ms)


def eplb_result(counts: np.ndarray, topo: Topology, placement: np.ndarray, prev_placement: np.ndarray | None,
                plan_ms: float = 0.0) -> StrategyResult:
    """What an EPLB placement does with one batch: counts [M, L, G, E], placement [L, P] encoded as in
    relibra_verl.planner.baselines (every expert's pairs split evenly over its copies)."""
    M, L, G, E = counts.shape
    phy2log = physical_to_logical(placement)
    logcnt = np.zeros((L, E))
    np.add.at(logcnt, (np.repeat(np.arange(L), phy2log.shape[1]), phy2log.reshape(-1)), 1.0)
    share = counts.astype(np.float64) / logcnt[None, :, None, :]
    per_phy = np.take_along_axis(share, np.broadcast_to(phy2log[None, :, None, :], (M, L, G, phy2log.shape[1])), axis=3)
    per_slot = per_phy.reshape(M, L, G, G, topo.S + topo.R)                   # [m, l, src, dst rank, slot]
    traffic = per_slot.sum(-1)                                                # [m, l, src, dst]
    calls = (per_slot.sum(2) > 0).sum(-1)                                     # [m, l, dst]: slots with pairs
    return StrategyResult("", traffic.sum(2), traffic, np.zeros((M, L, G), np.int64), redundant_per_rank(placement, topo),
                          moved_homes(prev_placement, placement, topo), np.asarray(placement), plan_ms, calls=calls)


def run_strategy(name: str, counts: np.ndarray, topo: Topology, history_counts: np.ndarray | None = None,
                 prev_placement: np.ndarray | None = None, num_groups: int = 1,
                 replication: ReplicationConfig = ReplicationConfig(),
                 reorder: ReorderConfig = ReorderConfig(), node_of_expert: np.ndarray | None = None) -> StrategyResult:
    """Apply strategy `name` to one batch.

    counts: [M, L, G, E] this batch's loads.  history_counts: [M', L, G, E] the previous batch's loads
    (eplb-history), the window of past loads (eplb-periodic; None: no history yet, EPLB then sees uniform
    loads).  prev_placement: the `placement` of this strategy's result for the previous batch (None:
    Megatron's layout).  num_groups: the model's
    expert groups (EPLB's hierarchical mode needs groups divisible by nodes).  node_of_expert: [L, E]
    relibra-locality's expert nodes (counts then are of its co-placed data; None: the data placement fell
    back, and it plans as relibra).
    """
    counts = np.asarray(counts, dtype=np.int64)
    M, L, G, E = counts.shape
    if name == "megatron":
        res = _relibra(counts, dataclasses.replace(topo, replica_slots=0), "replicate", None, replication, reorder)
    elif name == "ideal":
        total = counts.sum(axis=(2, 3)).astype(np.float64)                    # [M, L]
        rank_tokens = np.repeat((total / G)[:, :, None], G, axis=2)
        traffic = np.repeat((counts.sum(-1) / G)[:, :, :, None].astype(np.float64), G, axis=3)
        res = StrategyResult("", rank_tokens, traffic, np.zeros((M, L, G), np.int64), np.zeros((L, G), np.int64),
                             np.zeros(L, np.int64), identity_placement(topo, L), 0.0)
    elif name in ("eplb-oracle", "eplb-history", "eplb-periodic"):
        if name == "eplb-oracle":
            weight = counts.sum(axis=(0, 2))
        elif history_counts is None:
            weight = np.ones((L, E))
        else:
            weight = np.asarray(history_counts).sum(axis=(0, 2))
        res = _eplb(counts, topo, weight, prev_placement, num_groups)
    elif name in ("relibra", "relibra-reorder", "relibra-replicate"):
        mode = {"relibra": "both", "relibra-reorder": "reorder", "relibra-replicate": "replicate"}[name]
        prev = prev_placement if mode != "replicate" else None
        res = _relibra(counts, topo, mode, prev, replication, reorder)
    elif name == "relibra-locality":
        # the data placement's expert nodes as the reorder's preferred nodes: what verl's workers do with the hint
        res = _relibra(counts, topo, "both", prev_placement, replication, reorder, preferred_node=node_of_expert)
    else:
        raise PlanError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    res.name = name
    return res
