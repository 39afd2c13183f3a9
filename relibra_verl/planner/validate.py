"""Plan validation: design.md's invariants 1-3, each failure naming the invariant and where it fails."""
from __future__ import annotations

from typing import Callable

import numpy as np

from relibra_verl.planner.types import BatchPlan, PlanError


def _fail(invariant: int, what: str) -> None:
    raise PlanError(f"invariant {invariant} violated: {what}")


def validate_plan(plan: BatchPlan, counts: np.ndarray) -> None:
    """Check invariants 1 and 2 of a relibra BatchPlan against the loads it was planned for.

    counts: [M, L, G, E].  Raises PlanError("invariant N violated: ...") on the first failure.
    """
    t = plan.topo
    M, L, G, E = counts.shape
    if (G, E) != (t.G, t.E):
        _fail(2, f"plan is for G={t.G}, E={t.E}; loads are for G={G}, E={E}")
    if plan.expert_at_home.shape != (L, E):
        _fail(2, f"placement has shape {plan.expert_at_home.shape}, expected {(L, E)}")
    if plan.replica_expert.shape != (M, L, G, t.R) or plan.replica_quota.shape != (M, L, G, t.R, G):
        _fail(2, f"replica tables have shapes {plan.replica_expert.shape} / {plan.replica_quota.shape}, "
                 f"expected {(M, L, G, t.R)} / {(M, L, G, t.R, G)} (R={t.R} replica slots per rank)")
    # invariant 2: placement is a permutation per layer
    sorted_place = np.sort(plan.expert_at_home, axis=1)
    bad = np.flatnonzero((sorted_place != np.arange(E)).any(1))
    if len(bad):
        _fail(2, f"placement of layer {bad[0]} is not a permutation of the {E} experts")
    rep = plan.replica_expert
    if ((rep < -1) | (rep >= E)).any():
        m, l, r, k = np.argwhere((rep < -1) | (rep >= E))[0]
        _fail(2, f"replica slot {k} of rank {r} (micro-batch {m}, layer {l}) names expert {rep[m, l, r, k]}, outside [-1, {E})")
    nodes = np.asarray(t.node_of_rank)
    home_rank = plan.home_of_expert() // t.S                               # [L, E]
    filled = rep >= 0
    m_i, l_i, r_i, k_i = np.nonzero(filled)
    e_i = rep[filled]
    h_i = home_rank[l_i, e_i]
    off = nodes[h_i] != nodes[r_i]
    if off.any():
        j = np.flatnonzero(off)[0]
        _fail(2, f"replica of expert {e_i[j]} on rank {r_i[j]} (node {nodes[r_i[j]]}) but its home is rank {h_i[j]} "
                 f"(node {nodes[h_i[j]]}) (micro-batch {m_i[j]}, layer {l_i[j]})")
    same = h_i == r_i
    if same.any():
        j = np.flatnonzero(same)[0]
        _fail(2, f"rank {r_i[j]} holds a replica of its own home expert {e_i[j]} (micro-batch {m_i[j]}, layer {l_i[j]})")
    key = (m_i * L + l_i) * G * E + r_i * E + e_i
    uniq, cnt = np.unique(key, return_counts=True)
    if (cnt > 1).any():
        k = uniq[cnt > 1][0]
        _fail(2, f"rank {(k // E) % G} holds two copies of expert {k % E} (micro-batch {k // (G * E) // L}, layer {k // (G * E) % L})")
    q = plan.replica_quota
    if (q < 0).any():
        _fail(1, "a quota is negative")
    if (q[~filled] != 0).any():
        m, l, r, k = np.argwhere((q.sum(-1) != 0) & ~filled)[0]
        _fail(1, f"empty replica slot {k} of rank {r} has a nonzero quota (micro-batch {m}, layer {l})")
    # invariant 1: per (source rank, expert) the replica quotas never exceed its pairs, so home >= 0
    diverted = np.zeros((M, L, G, E), dtype=np.int64)                       # [m, l, src, e]
    np.add.at(diverted, (m_i, l_i, slice(None), e_i), q[m_i, l_i, r_i, k_i])
    over = diverted > counts
    if over.any():
        m, l, r, e = np.argwhere(over)[0]
        _fail(1, f"quotas send {diverted[m, l, r, e]} of source rank {r}'s pairs for expert {e} to replicas, "
                 f"but it holds only {counts[m, l, r, e]} (micro-batch {m}, layer {l})")


def check_deterministic(planner: Callable[[], BatchPlan], repeats: int = 2) -> str:
    """Invariant 3: run the planner `repeats` times; every run must give the same digest. Returns it."""
    digests = {planner().digest() for _ in range(repeats)}
    if len(digests) != 1:
        _fail(3, f"the planner gave {len(digests)} different plans for the same inputs")
    return digests.pop()
