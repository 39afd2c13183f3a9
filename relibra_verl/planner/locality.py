"""Routing-aware data placement: which DP rank holds which sequence, and which node holds which expert, so
that routed pairs stay on their node.

verl's driver balances the batch over DP ranks by attention workload alone (RayPPOTrainer._balance_batch),
blind to routing; with routing replay every sequence's routes are known at that moment. Sequences that
use the same experts (one domain, or the responses to one prompt) can then share a node with those
experts, and their pairs skip InfiniBand. The planner alternates two greedy steps until the share of
cross-node pairs stops falling:

  1. sequences -> nodes, given expert -> node: each mini-batch's sequences, most decided first (largest
     margin between their best and second-best node), to the node holding most of their pairs, every node
     taking its ranks' share of every stratum of the mini-batch's sequences by attention workload (so
     the ranks stay within `workload_tolerance` of verl's busiest); inside a node, heaviest first to its
     lightest rank;
  2. expert -> node, per layer, given sequences -> nodes: each expert, most decided first, to the node that
     sends it most pairs (its node in force wins unless another gains `expert_stickiness`), every node
     taking E / N experts and at most its share of the layer's pairs (plus `node_load_tolerance`), so
     that relibra's reorder, which then balances every micro-batch, starts from balanced nodes.

verl's constraints are kept: every rank gets verl's number of sequences of every mini-batch (the
mini-batches themselves are verl's: only which rank of it holds a sequence changes, which verl's loss
normalisation does not see), and the busiest rank's attention workload stays within `workload_tolerance`
of verl's own partition's. Where co-placing lowers the busiest node's cross-node pairs by less than
`min_gain` (one node, a single-domain batch), verl's placement is kept and the result says so (`fell_back`,
`reason`).

Glossary: S sequences, L MoE layers, E experts per layer, D DP ranks (each on one of N nodes, D / N per
node), B mini-batches. Ties go to the previous assignment (experts) or verl's node (sequences), then to the
lowest index: the plan is deterministic.
"""
from __future__ import annotations

import dataclasses
import time

import numba
import numpy as np

from relibra_verl.planner.types import PlanError, check_node_of_expert, invert_placement


@dataclasses.dataclass(frozen=True)
class LocalityConfig:
    """Knobs of the co-placement planner.

    workload_tolerance: the busiest DP rank's attention workload may exceed that of verl's partition by at
        most this fraction (else the plan falls back to verl's).
    node_load_tolerance: a node may take at most (1 + this) x its share of a layer's routed pairs.
    min_gain: fall back to verl's placement when the busiest node's cross-node pairs (sent or received,
        summed over layers: what sets the dispatch's time over InfiniBand; DataPlacement.nic_gain) fall by
        less than this fraction. Not the share of cross-node pairs: co-placing concentrates the traffic that
        still crosses, so the share can fall while the busiest NIC does not. Measured in the simulator on five
        batches (docs/verl.md), this rule at 0.05 chose as the step time did on three, the share's at 0.05
        on two; neither sees the attention imbalance and expert migration that co-placing adds.
    rounds: most alternations of the two steps.
    expert_stickiness: an expert keeps its node in force unless another node sends it more pairs by this
        fraction of the layer's mean pairs per expert (a move ships its weights and optimizer state).
    """

    workload_tolerance: float = 0.05
    node_load_tolerance: float = 0.05
    min_gain: float = 0.05
    rounds: int = 8
    expert_stickiness: float = 0.5

    def __post_init__(self):
        if min(self.workload_tolerance, self.node_load_tolerance, self.expert_stickiness) < 0 or self.rounds < 1:
            raise PlanError(f"LocalityConfig needs tolerances >= 0 and rounds >= 1, got {self}")


@dataclasses.dataclass
class DataPlacement:
    """The co-placement planner's choice.

    rank_of_seq:        [S] DP rank of every sequence (verl's on fallback).
    node_of_expert:     [L, E] node of every expert (None on fallback: the reorder decides freely).
    inter_node_fraction: share of routed pairs crossing nodes under this placement (on fallback: verl's
                        data with the expert nodes in force, prev_node_of_expert).
    verl_fraction:      the same share for verl's data placement with the expert nodes in force.
    verl_best_fraction: verl's data placement with the best expert nodes for it (what the gain is
                        measured against: co-placing is credited only with what moving the data adds).
    nic_gain:           how much the co-placement lowers the busiest node's cross-node pairs (sent or
                        received, the larger; summed over layers: what sets the all-to-all's time over
                        InfiniBand), relative to verl's data with the expert nodes in force (0 on fallback
                        before planning).
    fell_back, reason:  whether verl's placement was kept, and why ("" when not).
    rounds:             alternations run.
    plan_ms:            wall time.
    """

    rank_of_seq: np.ndarray
    node_of_expert: np.ndarray | None
    inter_node_fraction: float
    verl_fraction: float
    verl_best_fraction: float
    nic_gain: float
    fell_back: bool
    reason: str
    rounds: int
    plan_ms: float

    def metrics(self, prefix: str = "relibra/") -> dict[str, float]:
        """Scalars for a trainer's logger."""
        return {f"{prefix}inter_node_fraction": self.inter_node_fraction,
                f"{prefix}inter_node_fraction_verl": self.verl_fraction,
                f"{prefix}data_placement_nic_gain": self.nic_gain,
                f"{prefix}data_placement_fell_back": float(self.fell_back),
                f"{prefix}data_placement_ms": self.plan_ms}


def verl_workload(seq_lens: np.ndarray) -> np.ndarray:
    """[S] verl 0.9.1's relative attention workload of each sequence (seqlen_balancing.calculate_workload)."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    return 24576 * seq_lens + seq_lens ** 2


def usage_from_routes(expert_ids: np.ndarray, seq_offsets: np.ndarray, num_experts: int) -> np.ndarray:
    """Routes of consecutive sequences -> per-sequence usage.

    expert_ids: [T, L, K] (-1: unknown, not counted); seq_offsets: [S + 1].  Returns int32 [S, L, E]
    routed pairs of each sequence on each expert."""
    ids = np.asarray(expert_ids, dtype=np.int64)
    T, L, K = ids.shape
    offsets = np.asarray(seq_offsets, dtype=np.int64)
    seq_of_token = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    valid = ids >= 0
    flat = (seq_of_token[:, None, None] * L + np.arange(L)[None, :, None]) * num_experts + ids
    S = len(offsets) - 1
    return np.bincount(flat[valid], minlength=S * L * num_experts).reshape(S, L, num_experts).astype(np.int32)


def node_of_expert_of(expert_at_home: np.ndarray, node_of_rank: np.ndarray, experts_per_rank: int) -> np.ndarray:
    """[L, E] placement (expert per home slot) -> [L, E] node of every expert."""
    return np.asarray(node_of_rank)[invert_placement(np.asarray(expert_at_home)) // experts_per_rank]


def inter_node_fraction(usage: np.ndarray, node_of_seq: np.ndarray, node_of_expert: np.ndarray) -> float:
    """Share of routed pairs whose expert is on another node than their sequence.

    usage: [S, L, E]; node_of_seq: [S]; node_of_expert: [L, E]."""
    usage = np.asarray(usage)
    N = int(max(node_of_seq.max(initial=0), node_of_expert.max(initial=0))) + 1
    total = float(usage.sum(dtype=np.float64))
    if total == 0:
        return 0.0
    aff = _affinity(usage.reshape(len(usage), -1).astype(np.float64), node_of_expert, N)
    return 1.0 - float(aff[np.arange(len(usage)), node_of_seq].sum()) / total


def plan_locality(usage: np.ndarray, seq_lens: np.ndarray, node_of_rank: np.ndarray, verl_rank: np.ndarray,
                  minibatch: np.ndarray | None = None, prev_node_of_expert: np.ndarray | None = None,
                  config: LocalityConfig = LocalityConfig(), move_experts: bool = True) -> DataPlacement:
    """Sequences -> DP ranks and experts -> nodes that keep routed pairs on their node.

    usage: [S, L, E] routed pairs of each sequence on each expert.  seq_lens: [S] tokens per sequence.
    node_of_rank: [D] node of every DP rank (for DP > EP: the node, within its EP group, that the rank's
        tokens dispatch from; every node holds D / N ranks).  verl_rank: [S] verl's DP rank of each sequence.
    minibatch: [S] the mini-batch of each sequence (None: one); every rank keeps verl's count of each.
    prev_node_of_expert: [L, E] the expert nodes in force (None: Megatron's, expert e on node e // (E / N)).
    move_experts: False keeps the experts on prev_node_of_expert and places only the data (step 1 once).
    Returns a DataPlacement.
    """
    t0 = time.perf_counter()
    usage = np.asarray(usage)
    if usage.ndim != 3:
        raise PlanError(f"usage must be [sequences, layers, experts], got shape {usage.shape}")
    S, L, E = usage.shape
    node_of_rank = np.asarray(node_of_rank, dtype=np.int64)
    D = len(node_of_rank)
    N = int(node_of_rank.max(initial=0)) + 1
    ranks_per_node = np.bincount(node_of_rank, minlength=N)
    if (ranks_per_node != ranks_per_node[0]).any():
        raise PlanError(f"every node must hold the same number of DP ranks; got {ranks_per_node.tolist()}")
    if E % N:
        raise PlanError(f"{E} experts per layer cannot be split evenly over {N} nodes")
    verl_rank = np.asarray(verl_rank, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    if verl_rank.shape != (S,) or seq_lens.shape != (S,):
        raise PlanError(f"verl_rank {verl_rank.shape} and seq_lens {seq_lens.shape} must be [{S}] (one per sequence)")
    if S and (verl_rank.min() < 0 or verl_rank.max() >= D):
        raise PlanError(f"verl_rank holds ranks outside [0, {D})")
    minibatch = np.zeros(S, np.int64) if minibatch is None else np.asarray(minibatch, dtype=np.int64)
    if minibatch.shape != (S,):
        raise PlanError(f"minibatch must be [{S}], got {minibatch.shape}")
    mbs = [np.flatnonzero(minibatch == b) for b in np.unique(minibatch)]
    if prev_node_of_expert is None:
        prev_node_of_expert = np.repeat(np.arange(N), E // N)[None].repeat(L, 0)
    prev_node_of_expert = check_node_of_expert(prev_node_of_expert, L, E, N, "prev_node_of_expert")

    flat = usage.reshape(S, L * E).astype(np.float64)
    total = float(flat.sum())
    workload = verl_workload(seq_lens).astype(np.float64)
    verl_node = node_of_rank[verl_rank]

    def fraction(node_of_seq, node_of_expert):
        if total == 0:
            return 0.0
        return 1.0 - float(_affinity(flat, node_of_expert, N)[np.arange(S), node_of_seq].sum()) / total

    verl_fraction = fraction(verl_node, prev_node_of_expert)

    def done(rank, nodes, frac, fell_back, reason, rounds, best, nic_gain=0.0):
        return DataPlacement(rank, nodes, frac, verl_fraction, best, nic_gain, fell_back, reason, rounds,
                             (time.perf_counter() - t0) * 1e3)

    if N == 1 or total == 0:
        return done(verl_rank, None, verl_fraction, True, "one node" if N == 1 else "no routed pairs", 0, verl_fraction)
    if move_experts:
        best_for_verl = _assign_experts(_traffic(flat, verl_node, N).reshape(N, L, E), prev_node_of_expert, config)
        verl_best = fraction(verl_node, best_for_verl)
    else:
        verl_best = verl_fraction

    verl_peak = _rank_peak(workload, verl_rank, D)
    limit = verl_peak * (1 + config.workload_tolerance)
    stratum = max(1, max(len(idx) for idx in mbs) // D)    # a whole mini-batch in one stratum: freest, least even
    nodes = prev_node_of_expert
    best = None
    rounds = 0
    for rounds in range(1, config.rounds + 1):
        aff = _affinity(flat, nodes, N)
        while True:
            rank = _assign_sequences(aff, workload, mbs, node_of_rank, verl_rank, stratum, config.workload_tolerance)
            if _rank_peak(workload, rank, D) <= limit or stratum == 1:
                break
            stratum //= 2
        if _rank_peak(workload, rank, D) > limit:
            break
        if move_experts:
            nodes = _assign_experts(_traffic(flat, node_of_rank[rank], N).reshape(N, L, E), prev_node_of_expert,
                                    config)
        frac = fraction(node_of_rank[rank], nodes)
        if best is not None and frac >= best[0] - 1e-9:
            break
        best = (frac, rank, nodes)
        if not move_experts:
            break
    if best is None:
        return done(verl_rank, None, verl_fraction, True,
                    f"attention workload: busiest rank {_rank_peak(workload, rank, D) / verl_peak:.3f} x verl's",
                    rounds, verl_best)
    frac, rank, nodes = best
    verl_nic = _busiest_cross(flat, verl_node, prev_node_of_expert, N)
    nic_gain = 1.0 - _busiest_cross(flat, node_of_rank[rank], nodes, N) / verl_nic if verl_nic > 0 else 0.0
    if nic_gain < config.min_gain:
        return done(verl_rank, None, verl_fraction, True, f"gain {nic_gain:.3f} of the busiest node's cross-node "
                    f"pairs below min_gain {config.min_gain}", rounds, verl_best, nic_gain)
    return done(rank, nodes, frac, False, "", rounds, verl_best, nic_gain)


def _affinity(flat: np.ndarray, node_of_expert: np.ndarray, N: int) -> np.ndarray:
    """[S, N] pairs of each sequence (flat [S, L * E]) on the experts of each node (node_of_expert [L, E])."""
    onehot = (node_of_expert.reshape(-1)[:, None] == np.arange(N)).astype(np.float64)     # [L * E, N]
    return flat @ onehot


def _traffic(flat: np.ndarray, node_of_seq: np.ndarray, N: int) -> np.ndarray:
    """[N, L * E] pairs each node's sequences (node_of_seq [S]) send to each (layer, expert)."""
    onehot = (node_of_seq[:, None] == np.arange(N)).astype(np.float64)                   # [S, N]
    return onehot.T @ flat


def _busiest_cross(flat: np.ndarray, node_of_seq: np.ndarray, node_of_expert: np.ndarray, N: int) -> float:
    """Sum over layers of the busiest node's cross-node pairs (sent or received, the larger). flat [S, L * E],
    node_of_seq [S], node_of_expert [L, E]."""
    L, E = node_of_expert.shape
    traffic = _traffic(flat, node_of_seq, N).reshape(N, L, E)                       # [src, L, E]
    onehot = (node_of_expert[:, :, None] == np.arange(N)).astype(np.float64)       # [L, E, dst]
    pairs = np.einsum("sle,led->lsd", traffic, onehot)                              # [L, src, dst]
    cross = pairs * (1 - np.eye(N))[None]
    return float(np.maximum(cross.sum(2), cross.sum(1)).max(1).sum())


def _rank_peak(workload: np.ndarray, rank: np.ndarray, D: int) -> float:
    return float(np.bincount(rank, weights=workload, minlength=D).max())


def _order_by_margin(score: np.ndarray) -> np.ndarray:
    """Items most decided first: descending margin between their best and second-best bin (score [n, N]),
    ties by index. Returns [n]."""
    top2 = np.sort(score, axis=1)[:, -2:]
    return np.argsort(-(top2[:, 1] - top2[:, 0]), kind="stable")


def _assign_sequences(aff: np.ndarray, workload: np.ndarray, mbs: list[np.ndarray], node_of_rank: np.ndarray,
                      verl_rank: np.ndarray, stratum: int, tolerance: float) -> np.ndarray:
    """Step 1: sequences -> nodes -> ranks. aff: [S, N] pairs per node; workload: [S]; mbs: each
    mini-batch's sequence indices; verl_rank: [S] (every rank keeps verl's count of each mini-batch; ties
    go to verl's node); stratum: sequences per rank per stratum.

    Each mini-batch's sequences, heaviest first, are cut into strata of D x stratum; every rank takes
    `stratum` sequences of every stratum (the last ones: what remains of its count), so ranks end within
    one stratum's spread of workload of each other (stratum 1: at most the heaviest minus the lightest
    sequence in all), and inside a stratum sequences go to nodes by pairs, most decided first, and inside a
    node heaviest first to its lightest rank; a node never runs ahead of its share of the workload placed
    so far by more than tolerance / 2 of its final share (or one sequence of the stratum, where that is
    more). Returns rank [S]."""
    S, N = aff.shape
    D = len(node_of_rank)
    rank = np.empty(S, dtype=np.int64)
    rank_load = np.zeros(D)                                 # attention workload, accumulated over strata
    ranks_of_node = np.bincount(node_of_rank, minlength=N)
    # a sequence's own (verl's) node wins ties: 2 x pairs (integers) + 1
    score = 2 * aff + (node_of_rank[verl_rank][:, None] == np.arange(N))
    for idx in mbs:
        idx = idx[np.lexsort((idx, -workload[idx]))]
        caps = np.bincount(verl_rank[idx], minlength=D)
        base = int(caps.min())
        quotas = [np.full(D, min(stratum, base - lo)) for lo in range(0, base, stratum)]
        if (caps > base).any():
            quotas.append(caps - base)
        lo = 0
        for quota in quotas:
            part = idx[lo:lo + quota.sum()]
            lo += len(part)
            node_quota = np.bincount(node_of_rank, weights=quota, minlength=N)
            count = np.zeros(N)
            members = [[] for _ in range(N)]
            node_load = np.bincount(node_of_rank, weights=rank_load, minlength=N)
            # a node may run ahead of its share of the workload placed so far by half the tolerance, or
            # by one of the stratum's sequences where that is more (few sequences per rank)
            slack = np.maximum(tolerance / 2 * workload[idx].sum() * ranks_of_node / D, workload[part].max())
            for s in part[_order_by_margin(score[part])]:
                room = count < node_quota
                share = (node_load.sum() + workload[s]) * ranks_of_node / D
                fits = room & (node_load + workload[s] <= share + slack)
                n = int(np.argmax(np.where(fits, score[s], -np.inf)) if fits.any() else np.argmin(np.where(room, node_load, np.inf)))
                members[n].append(s)
                count[n] += 1
                node_load[n] += workload[s]
            taken = np.zeros(D, dtype=np.int64)
            for n in range(N):
                for s in sorted(members[n], key=lambda s: (-workload[s], s)):
                    open_ = np.flatnonzero((node_of_rank == n) & (taken < quota))
                    r = open_[np.argmin(rank_load[open_])]
                    rank[s] = r
                    rank_load[r] += workload[s]
                    taken[r] += 1
    return rank


def _assign_experts(traffic: np.ndarray, prev: np.ndarray, config: LocalityConfig) -> np.ndarray:
    """Step 2: experts -> nodes, every layer at once. traffic: [N, L, E] pairs each node sends to each
    expert; prev: [L, E] the nodes in force (an expert stays unless moving gains config.expert_stickiness x
    the layer's mean pairs per expert; ties stay). Returns [L, E] with E / N experts per node."""
    N, L, E = traffic.shape
    cap = E // N
    load_e = traffic.sum(0)                                              # [L, E]
    load_cap = (1 + config.node_load_tolerance) * load_e.sum(1, keepdims=True) / N      # [L, 1]
    stay = config.expert_stickiness * load_e.mean(1)[:, None, None] + 0.5              # [L, 1, 1] pairs
    score = traffic.transpose(1, 2, 0) + stay * (prev[:, :, None] == np.arange(N))     # [L, E, N]
    top2 = np.sort(score, axis=2)[:, :, -2:]
    order = np.argsort(-(top2[:, :, 1] - top2[:, :, 0]), axis=1, kind="stable")   # [L, E]
    rows = np.arange(L)
    count = np.zeros((L, N), dtype=np.int64)
    load = np.zeros((L, N))
    out = np.empty((L, E), dtype=np.int64)
    for i in range(E):
        e = order[:, i]
        w = load_e[rows, e][:, None]
        room = count < cap
        fits = room & (load + w <= load_cap)
        best_fit = np.argmax(np.where(fits, score[rows, e], -np.inf), axis=1)
        lightest = np.argmin(np.where(room, load, np.inf), axis=1)
        n = np.where(fits.any(1), best_fit, lightest)
        out[rows, e] = n
        count[rows, n] += 1
        load[rows, n] += w[:, 0]
    return out


def count_routed_pairs(routes: np.ndarray) -> np.ndarray:
    """One sequence's routes [T, L, K] (expert ids, any integer dtype) -> its routed pairs per layer and
    expert [L, max id + 1], int32. Compiled: the driver counts every sequence of the batch each step (at
    Qwen3-30B-A3B scale a 1,000-token sequence is 384k ids; numpy's bincount needs an int64 copy first)."""
    routes = np.ascontiguousarray(routes)
    if routes.ndim != 3:
        raise PlanError(f"routes of a sequence must be [tokens, layers, top-k], got shape {routes.shape}")
    if routes.dtype.kind not in "iu":
        raise PlanError(f"routes must hold integer expert ids, got dtype {routes.dtype}")
    if routes.size and routes.dtype.kind == "i" and routes.min() < 0:
        raise PlanError(f"routes hold a negative expert id ({int(routes.min())})")
    width = int(routes.max(initial=0)) + 1
    return _count_pairs(routes, width)


@numba.njit(nogil=True, cache=True)
def _count_pairs(routes, width):
    T, L, K = routes.shape
    out = np.zeros((L, width), np.int32)
    for t in range(T):
        for layer in range(L):
            for k in range(K):
                out[layer, routes[t, layer, k]] += 1
    return out
