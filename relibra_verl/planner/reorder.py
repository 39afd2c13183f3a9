"""Reorder: a new placement of the experts (which rank is each expert's home) for the batch, once per batch,
across nodes.

Each expert's load is a vector over the batch's micro-batches; experts are packed heaviest first, each onto
the node (then, inside the node, the rank) that adds least to the sum of squared per-micro-batch loads,
i.e. that keeps every micro-batch balanced, not just the batch total, and expert swaps between the most
different nodes (ranks) repair what the greedy left. Node and rank labels are then matched to the previous
placement so that as few experts as possible change rank; a layer whose previous placement is already
within `keep_tolerance` of the new one keeps it (no moves). With move costs, each layer (and each node's
ranks) takes, among packings of increasing stickiness and the previous assignment, the cheapest
(_cheapest_assignment).

plan_placement runs each assignment problem (a layer's experts -> nodes, a node's experts -> its ranks)
start to finish in compiled code (reorder_kernels.py: numba, nogil, cached on disk). The numpy functions
here, over all problems at once, are its readable reference: _plan_placement(..., compiled=False) runs them,
and tests/planner/test_reorder_kernels.py checks that both give the same placements. Loads are integer pair
counts held as floats, so the sums and dot products the choices compare are exact in any order (the costs
add integers before they weigh them, the swaps compare load differences, not deviations from a mean).
"""
from __future__ import annotations

import dataclasses

import numba
import numpy as np

from relibra_verl.planner import reorder_kernels
from relibra_verl.planner.reorder_kernels import _dot
from relibra_verl.planner.types import Topology, check_node_of_expert, identity_placement, invert_placement

_jit = numba.njit(nogil=True, cache=True)

@dataclasses.dataclass(frozen=True)
class ReorderConfig:
    """Knobs of the reordering planner.

    keep_tolerance: keep the previous placement of a layer when the new one lowers its squared
        per-micro-batch node-and-rank load imbalance by less than this fraction.
    max_moves_per_layer: a layer whose new placement would move more experts keeps its old one.
    node_stickiness, rank_stickiness: an expert keeps its node (rank) when that costs at most this
        fraction of its load times the mean node (rank) load in squared imbalance (see _pack_vectors);
        0 ignores moves (the defaults: the move costs below choose the stickiness per layer instead).
    move_cost_pairs: what moving one expert's state across nodes costs, in routed pairs of one rank's
        expert compute (relibra_verl.planner.configs.move_cost_pairs derives it from a hardware profile).
        When > 0, each layer takes, among node assignments of increasing stickiness and the previous
        one, the one with the least sum over micro-batches of (max node load / g) + moves / G * cost.
    inter_node_share: when > 0 (and counts are at hand), that choice also weighs each micro-batch's
        busiest InfiniBand NIC against the busiest node's GEMMs (_node_cost); costs planner time.
    rank_move_cost_pairs: the same for a move between ranks of one node (NVLink), in routed pairs on the
        busiest rank (relibra_verl.planner.configs.rank_move_cost_pairs). When > 0, each (layer, node) takes
        its rank assignment the same way (_assign_ranks).
    migration_pairs: (over InfiniBand, over NVLink) what one expert's move costs the step, in units of the
        replication objective J (relibra_verl.planner.replicate): what plan_relibra weighs a new placement's
        migration against its gain in J with (relibra_verl.planner.configs.migration_pairs). (0, 0): moves
        are free, a layer moves whenever its J drops.
    migration_horizon: the batches a new placement's gain is counted over against its migration, which is
        paid once. A placement outlasts the batch it is planned on (the verl trainer plans it on one batch's
        loads for the next; later plans start from it). Measured along bench/simulate_table.sh's runs, the
        first placement away from Megatron's layout kept 56% of its gain on the next batch (step time) on
        synthetic DeepSeek-V3 routing (v3_128) and 79% (J) on the resampled real traces (ep16_small): geometric
        horizons of 2.3 and 4.8 batches; 3 lies between. 1 weighs the batch alone: the first move, the
        largest, is then never repaid by one batch and Megatron's layout stays for good (simulated step
        time, of ideal: v3_128 0.963 at 1 against 0.974 at 3, ep16_small 0.935 against 0.963).
    """

    keep_tolerance: float = 0.01
    max_moves_per_layer: int | None = None
    node_stickiness: float = 0.0
    rank_stickiness: float = 0.0
    move_cost_pairs: float = 0.0
    inter_node_share: float = 0.0
    rank_move_cost_pairs: float = 0.0
    migration_pairs: tuple[float, float] = (0.0, 0.0)
    migration_horizon: float = 3.0


# the least cost (routed pairs) of an expert away from plan_placement's preferred_node: a tie-breaker
_PREFERRED_MOVE_PAIRS = 1.0
# stickiness values tried by the move-cost-aware node assignment (0: balance only ... 1: strongly sticky)
_NODE_STICKINESS_CANDIDATES = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)


def _pack_vectors(weight: np.ndarray, num_bins: int, prev_bin: np.ndarray | None = None,
                  stickiness: float | np.ndarray = 0.0) -> np.ndarray:
    """Greedy vector packing: items heaviest first, each into the bin (with room) that adds least to the
    sum of squared bin loads over the vector's dimensions. Every bin takes n / num_bins items.

    An item stays in its previous bin when that costs at most `stickiness` x (its load . the mean
    bin load) more than the best bin: the price of balance we accept to avoid moving an expert.

    weight: [P, n, D] nonnegative.  prev_bin: [P, n] (-1: none).  stickiness: a number, or [P] one per
    problem (several levels packed in one pass).  Returns bin_of_item [P, n].
    """
    P, n, D = weight.shape
    stickiness = np.ascontiguousarray(np.broadcast_to(np.asarray(stickiness, dtype=np.float64), (P,)))
    sticky = prev_bin is not None and bool((stickiness > 0).any())
    prev = np.full((P, n), -1, dtype=np.int64) if prev_bin is None else np.ascontiguousarray(prev_bin, dtype=np.int64)
    order = np.argsort(-weight.sum(-1), axis=1, kind="stable")
    bin_of_item = np.empty((P, n), dtype=np.int64)
    _pack(np.ascontiguousarray(weight, dtype=np.float64), order, num_bins, prev, stickiness, sticky, bin_of_item)
    return bin_of_item


@_jit
def _pack(weight, order, num_bins, prev, stickiness, sticky, bin_of_item):
    """_pack_vectors for every problem; order [P, n] the items heaviest first. Writes bin_of_item [P, n]."""
    P, n, D = weight.shape
    per_bin = n // num_bins
    bin_load = np.zeros((num_bins, D))
    bin_items = np.zeros(num_bins, dtype=np.int64)
    mean_bin = np.zeros(D)
    score = np.empty(num_bins)
    for p in range(P):
        bin_load[:] = 0.0
        bin_items[:] = 0
        mean_bin[:] = 0.0
        for i in range(n):
            mean_bin += weight[p, i]
        mean_bin /= num_bins
        for i in range(n):
            item = order[p, i]
            w = weight[p, item]
            b = 0
            for k in range(num_bins):
                # growth of the sum of squares (halved)
                score[k] = _dot(bin_load[k], w) if bin_items[k] < per_bin else np.inf
                if score[k] < score[b]:
                    b = k
            if sticky:
                pb = prev[p, item]
                if pb >= 0 and score[pb] <= score[b] + stickiness[p] * _dot(w, mean_bin):
                    b = pb
            bin_of_item[p, item] = b
            bin_load[b] += w
            bin_items[b] += 1


def _match_labels(new_label: np.ndarray, old_label: np.ndarray, num_labels: int) -> np.ndarray:
    """Rename new labels so they agree with old labels on as many items as possible (greedy matching).

    new_label, old_label: [P, n] in [0, num_labels) (old may be -1: no preference).
    Returns relabelled [P, n].
    """
    P, n = new_label.shape
    overlap = np.zeros((P, num_labels, num_labels), dtype=np.int64)
    valid = old_label >= 0
    p_idx = np.broadcast_to(np.arange(P)[:, None], (P, n))
    np.add.at(overlap, (p_idx[valid], new_label[valid], old_label[valid]), 1)
    mapping = np.full((P, num_labels), -1, dtype=np.int64)
    rows = np.arange(P)
    work = overlap.astype(np.float64)
    for _ in range(num_labels):
        flat = np.argmax(work.reshape(P, -1), axis=1)
        a, b = flat // num_labels, flat % num_labels
        mapping[rows, a] = b
        work[rows, a, :] = -1
        work[rows, :, b] = -1
    return np.take_along_axis(mapping, new_label, axis=1)


def plan_placement(counts: np.ndarray, topo: Topology, prev: np.ndarray | None = None,
                   config: ReorderConfig = ReorderConfig(), total: np.ndarray | None = None,
                   preferred_node: np.ndarray | None = None) -> np.ndarray:
    """A new placement for the batch from its exact loads: nodes first, then ranks inside each node.

    counts: [M, L, G, E].  prev: [L, E] expert in each home slot (None: Megatron's identity).
    total: counts summed over ranks [M, L, E], when at hand.  Returns expert_at_home [L, E].
    preferred_node: [L, E] a node for every expert chosen with the data (relibra_verl.planner.locality),
    E / N per node: the node assignment takes it for the experts' nodes in force (its stickiness, its
    kept candidate, its labels; an expert away from it costs move_cost_pairs, at least one pair), and the
    balance-only keep rule is skipped: plan_relibra weighs the result, whose inter-node pairs its
    objective sees, with the real migration from prev.
    """
    return _plan_placement(counts, topo, prev, config, total, preferred_node, compiled=True)


def _plan_placement(counts, topo, prev, config, total, preferred_node, compiled):
    """plan_placement; compiled False: the numpy reference of every step (tests compare the two)."""
    M, L, G, E = counts.shape
    S, N, g = topo.S, topo.num_nodes, topo.ranks_per_node
    prev = identity_placement(topo, L) if prev is None else np.asarray(prev, dtype=np.int64)
    if total is not None:
        load = np.asarray(total).transpose(1, 2, 0).astype(np.float64)  # [L, E, M] pairs per expert
    elif compiled:
        load = np.empty((L, E, M))
        reorder_kernels.expert_loads(counts, load)
    else:
        load = counts.sum(axis=2).transpose(1, 2, 0).astype(np.float64)
    node_ranks = topo.node_ranks()                                       # [N, g]
    rank_node = np.asarray(topo.node_of_rank)
    rank_pos = np.empty(G, dtype=np.int64)                               # position of a rank in its node
    rank_pos[node_ranks.reshape(-1)] = np.tile(np.arange(g), N)

    prev_home = invert_placement(prev)                                   # [L, E] home slot of each expert
    prev_rank = prev_home // S                                           # [L, E]

    # 1. experts -> nodes
    prev_node = rank_node[prev_rank]                                     # [L, E]
    if preferred_node is not None:
        prev_node = check_node_of_expert(preferred_node, L, E, N, "preferred_node")
        # leaving it costs at least one pair per expert: ties in balance go to the preferred node
        config = dataclasses.replace(config, move_cost_pairs=max(config.move_cost_pairs, _PREFERRED_MOVE_PAIRS))
    if N > 1:
        node_of = _assign_nodes(load, N, prev_node, config, topo, counts, compiled)
    else:
        node_of = np.zeros((L, E), dtype=np.int64)

    # 2. inside each node: its g*S experts -> its g ranks
    members = np.argsort(node_of, axis=1, kind="stable").reshape(L, N, g * S)   # experts of each node
    member_load = load[np.arange(L)[:, None], members.reshape(L, N * g * S)].reshape(L * N, g * S, M)
    old_rank = prev_rank.reshape(L, E)[np.arange(L)[:, None], members.reshape(L, -1)].reshape(L * N, g * S)
    same_node = rank_node[old_rank] == np.repeat(np.arange(N)[None], L, 0).reshape(L * N, 1)
    old_pos = np.where(same_node, rank_pos[old_rank], -1)
    if g > 1:
        pos_of = _assign_ranks(member_load, g, old_pos, config, compiled)
    else:
        pos_of = np.zeros((L * N, g * S), dtype=np.int64)
    rank_of = node_ranks[np.repeat(np.tile(np.arange(N), L)[:, None], g * S, 1), pos_of]   # [L*N, g*S]

    # 3. home slots: experts that stay on their rank keep their local slot, the rest fill the gaps
    rank_of_expert = np.empty((L, E), dtype=np.int64)
    np.put_along_axis(rank_of_expert, members.reshape(L, -1), rank_of.reshape(L, -1), axis=1)
    new = _fill_slots(rank_of_expert, prev, prev_home, S)

    # 4. keep the old placement where the new one is not clearly better (or moves too much)
    moves = (rank_of_expert != prev_rank).sum(1)
    cost = _placement_cost_compiled if compiled else _placement_cost
    keep = cost(load, prev, topo) <= cost(load, new, topo) * (1 + config.keep_tolerance)
    if preferred_node is not None:
        keep[:] = False
    if config.max_moves_per_layer is not None:
        keep |= moves > config.max_moves_per_layer
    return np.where(keep[:, None], prev, new)


def _assign_ranks(load: np.ndarray, g: int, old_pos: np.ndarray, config: ReorderConfig,
                  compiled: bool = True) -> np.ndarray:
    """Each node's experts -> its g ranks. load: [P, n, M] per (layer, node) problem, its n = g*S experts'
    per-micro-batch loads; old_pos: [P, n] each expert's previous rank position in the node (-1: it
    comes from another node). Returns pos_of [P, n] (S experts per position).

    Without a move cost: one greedy packing at config.rank_stickiness, refined by swaps. With
    config.rank_move_cost_pairs > 0, like _assign_nodes: among packings of increasing stickiness and the
    previous assignment (where the node kept its experts), then the refining swap steps on the chosen
    one, the one with the least _rank_cost (busiest rank per micro-batch plus the busiest rank's arrivals)."""
    if compiled:
        return _assign_compiled(load, g, old_pos, config.rank_stickiness, config.rank_move_cost_pairs > 0,
                                reorder_kernels.RANK_COST, (config.rank_move_cost_pairs, config.move_cost_pairs))
    cost = None
    if config.rank_move_cost_pairs > 0:
        cost = lambda cand: _rank_cost(cand, load, old_pos, g, config.rank_move_cost_pairs, config.move_cost_pairs)
    return _cheapest_assignment(load, g, old_pos, config.rank_stickiness, cost)


def _assign_compiled(load: np.ndarray, num_bins: int, prev: np.ndarray, stickiness: float, with_cost: bool,
                     cost_kind: int, params: tuple, counts: np.ndarray | None = None,
                     node_ranks: np.ndarray | None = None) -> np.ndarray:
    """_cheapest_assignment with the cost `cost_kind` and its params (reorder_kernels.assign_bins), compiled,
    one problem at a time; counts [M, P, G, E] and node_ranks [N, g] for a node cost with a NIC share > 0.
    Returns bin_of_item [P, n]."""
    P, n, M = load.shape
    if with_cost:
        levels = np.array(sorted(set(_NODE_STICKINESS_CANDIDATES) | {stickiness}), dtype=np.float64)
        sticky = bool((levels > 0).any())
    else:
        levels = np.array([stickiness], dtype=np.float64)
        sticky = stickiness > 0
    params = np.array(params + (0.0,) * (4 - len(params)), dtype=np.float64)
    counts = np.zeros((1, 1, 1, 1), dtype=np.int64) if counts is None else np.ascontiguousarray(counts)
    node_ranks = np.zeros((1, 1), dtype=np.int64) if node_ranks is None else np.ascontiguousarray(node_ranks, dtype=np.int64)
    out = np.empty((P, n), dtype=np.int64)
    reorder_kernels.assign_bins(np.ascontiguousarray(load, dtype=np.float64), num_bins,
                                np.ascontiguousarray(prev, dtype=np.int64), levels, sticky, with_cost, cost_kind,
                                params, counts, node_ranks, 8, out)
    return out


def _cheapest_assignment(load: np.ndarray, num_bins: int, prev: np.ndarray, stickiness: float, cost) -> np.ndarray:
    """Items -> bins (experts -> nodes, or a node's experts -> its ranks) for P problems. load: [P, n, M];
    prev: [P, n] each item's previous bin (-1: none). Returns bin_of_item [P, n] (n / num_bins per bin).

    cost None: one greedy packing at `stickiness`, labels matched to prev, refined by swaps. Otherwise
    cost(candidates [C, P, n]) -> [C, P]: per problem the cheapest of packings at every stickiness level
    and the previous assignment (where every item had a bin), then of the refining swap steps on it, so
    that each problem keeps only the moves that pay for themselves."""
    if cost is None:
        return _refine_by_swaps(load, _match_labels(_pack_vectors(load, num_bins, prev, stickiness), prev, num_bins),
                                num_bins)
    P, n, M = load.shape
    # every stickiness level packed in one pass: [levels * P] problems
    levels = np.array(sorted(set(_NODE_STICKINESS_CANDIDATES) | {stickiness}))
    K = len(levels)
    packed = _pack_vectors(np.tile(load, (K, 1, 1)), num_bins, np.tile(prev, (K, 1)), np.repeat(levels, P))
    packed = _match_labels(packed, np.tile(prev, (K, 1)), num_bins).reshape(K, P, n)
    previous = np.where((prev >= 0).all(axis=1, keepdims=True), prev, packed[0])
    stacked = np.concatenate([previous[None], packed])                   # [C, P, n]
    chosen = stacked[np.argmin(cost(stacked), axis=0), np.arange(P)]     # ties: the previous one
    steps = _refine_by_swaps(load, chosen, num_bins, every_step=True)   # [steps + 1, P, n]
    return steps[np.argmin(cost(steps), axis=0), np.arange(P)]


def _rank_cost(pos_of: np.ndarray, load: np.ndarray, old_pos: np.ndarray, g: int, move_cost: float,
               arrival_cost: float) -> np.ndarray:
    """[C, P] cost of candidate rank assignments pos_of [C, P, n] (load [P, n, M], old_pos [P, n]), in
    pairs: summed over micro-batches, the busiest rank's pairs, plus the migration of the rank that
    receives most: its experts from other ranks of the node (NVLink, move_cost each) or from other nodes
    (InfiniBand, arrival_cost each), whichever link takes longer (they run concurrently)."""
    busy = _busiest_bin(pos_of, load, g).sum(-1)
    moved = (pos_of != old_pos[None]) & (old_pos[None] >= 0)             # [C, P, n] over NVLink
    arrived = np.broadcast_to(old_pos[None] < 0, pos_of.shape)           # from another node
    nvl_in = _items_per_bin(pos_of, moved, g)
    ib_in = _items_per_bin(pos_of, arrived, g)
    return busy + np.maximum(nvl_in * move_cost, ib_in * arrival_cost).max(-1)


def _busiest_bin(bin_of: np.ndarray, load: np.ndarray, num_bins: int) -> np.ndarray:
    """[C, P, M] the most load any bin holds, per micro-batch, for candidate assignments bin_of [C, P, n] of
    the items of load [P, n, M]."""
    C, P, n = bin_of.shape
    out = np.empty((C, P, load.shape[2]))
    _busiest(np.ascontiguousarray(bin_of, dtype=np.int64), np.ascontiguousarray(load, dtype=np.float64), num_bins, out)
    return out


@_jit
def _busiest(bin_of, load, num_bins, out):
    C, P, n = bin_of.shape
    M = load.shape[2]
    acc = np.zeros((num_bins, M))
    for c in range(C):
        for p in range(P):
            acc[:] = 0.0
            for i in range(n):
                acc[bin_of[c, p, i]] += load[p, i]
            for m in range(M):
                out[c, p, m] = acc[:, m].max()


def _items_per_bin(bin_of: np.ndarray, mask: np.ndarray, num_bins: int) -> np.ndarray:
    """[C, P, num_bins] how many items of mask [C, P, n] each bin holds under bin_of [C, P, n]."""
    C, P, n = bin_of.shape
    flat = (np.arange(C * P)[:, None] * num_bins + bin_of.reshape(C * P, n))[mask.reshape(C * P, n)]
    return np.bincount(flat, minlength=C * P * num_bins).reshape(C, P, num_bins).astype(np.float64)


def _refine_by_swaps(load: np.ndarray, node_of: np.ndarray, N: int, iters: int = 8,
                     every_step: bool = False) -> np.ndarray:
    """Improve an assignment of experts to N bins (nodes, or the ranks of one node) by expert swaps: per
    problem and step, between the two bins whose per-micro-batch loads differ most, the swap that lowers
    the sum over micro-batches and bins of squared deviations from the mean the most (skipped when none
    does). The greedy packing places the last, light experts where they fit, not where they balance each
    micro-batch; swaps repair that.

    load: [L, E, M]; node_of: [L, E] (L problems).  Returns node_of [L, E] (same number of experts per
    bin), or with every_step the assignment before and after each step, [steps + 1, L, E].
    """
    L, E, M = load.shape
    members = np.argsort(node_of, axis=1, kind="stable").reshape(L, N, E // N)   # experts of each bin
    out = np.empty((iters + 1 if every_step else 1, L, E), dtype=np.int64)
    steps = _swap(np.ascontiguousarray(load, dtype=np.float64), members, iters, every_step, out)
    return out[:steps + 1] if every_step else out[0]


@_jit
def _swap(load, members, iters, every_step, out):
    """_refine_by_swaps for every problem: members [L, N, per] the items of each bin (changed in place).
    Writes the assignment after each step into out [iters + 1, L, E] (every_step) or the last into out[0].
    Returns the most steps any problem took."""
    L, E, M = load.shape
    _, N, per = members.shape
    node_load = np.zeros((N, M))
    delta = np.empty(M)
    proj_a = np.empty(per)
    proj_b = np.empty(per)
    sq = np.empty(E)
    most = 0
    for l in range(L):
        total = 0.0
        for e in range(E):
            sq[e] = _dot(load[l, e], load[l, e])                           # |w_e|^2
            total += sq[e]
        threshold = 1e-6 * max(total, 1.0)                                 # ignore swaps worth ~nothing
        node_load[:] = 0.0
        for n in range(N):
            for i in range(per):
                node_load[n] += load[l, members[l, n, i]]
        if every_step:
            _write_assignment(members[l], out[0, l])
        done = 0
        for step in range(iters):
            # the two bins that differ most, |load_h - load_k|^2 (integer loads: exact, unlike deviations from
            # their mean), the first such pair in (h, k) order
            h, k, far = 0, 0, 0.0
            for x in range(N):
                for y in range(x + 1, N):
                    f = _dot(node_load[x] - node_load[y], node_load[x] - node_load[y])
                    if f > far:
                        h, k, far = x, y, f
            delta[:] = node_load[h] - node_load[k]
            for i in range(per):
                proj_a[i] = _dot(load[l, members[l, h, i]], delta)
                proj_b[i] = _dot(load[l, members[l, k, i]], delta)
            # gain of swapping a (on h) with b (on k): 2 (w_a - w_b).delta - 2 |w_a - w_b|^2
            bi, bj, gain = 0, 0, -np.inf
            for i in range(per):
                a = members[l, h, i]
                for j in range(per):
                    b = members[l, k, j]
                    g = 2 * (proj_a[i] - proj_b[j]) - 2 * (sq[a] + sq[b] - 2 * _dot(load[l, a], load[l, b]))
                    if g > gain:
                        bi, bj, gain = i, j, g
            if not gain > threshold:
                break
            a, b = members[l, h, bi], members[l, k, bj]
            node_load[h] -= load[l, a] - load[l, b]
            node_load[k] += load[l, a] - load[l, b]
            members[l, h, bi], members[l, k, bj] = b, a
            done = step + 1
            if every_step:
                _write_assignment(members[l], out[done, l])
        if every_step:
            for step in range(done + 1, iters + 1):
                out[step, l] = out[done, l]
        else:
            _write_assignment(members[l], out[0, l])
        most = max(most, done)
    return most


@_jit
def _write_assignment(members, bin_of):
    """members [N, per] items of each bin -> bin_of [E]."""
    N, per = members.shape
    for n in range(N):
        for i in range(per):
            bin_of[members[n, i]] = n


def _assign_nodes(load: np.ndarray, N: int, prev_node: np.ndarray, config: ReorderConfig,
                  topo: Topology, counts: np.ndarray | None = None, compiled: bool = True) -> np.ndarray:
    """Experts -> nodes for every layer. load: [L, E, M]; prev_node: [L, E]; counts: [M, L, G, E] (for the
    inter-node terms). Returns node_of [L, E].

    With neither a move cost nor an inter-node share: one greedy packing at config.node_stickiness,
    refined by swaps. Otherwise, per layer, the cheapest of several stickiness levels and of keeping the
    previous assignment, then of the refining swap steps on it, where cost = _node_cost: per micro-batch
    the busiest node's pairs per rank and (inter_node_share > 0) the busiest NIC, plus the moves' cost
    (moves run in parallel over the G ranks; _cheapest_assignment). The candidates balance pairs; the cost
    picks among them the one whose sends and receives across nodes are most even."""
    with_cost = config.move_cost_pairs > 0 or config.inter_node_share > 0
    inter_node = with_cost and counts is not None and config.inter_node_share > 0
    if compiled:
        share = config.inter_node_share if inter_node else 0.0
        return _assign_compiled(load, N, prev_node, config.node_stickiness, with_cost, reorder_kernels.NODE_COST,
                                (topo.G // N, config.move_cost_pairs, topo.G, share),
                                counts if inter_node else None, topo.node_ranks())
    cost = None
    if with_cost:
        inter = _InterNodeLoads(np.asarray(counts), topo, load) if inter_node else None
        cost = lambda cand: _node_cost(cand, load, prev_node, config, topo, inter)
    return _cheapest_assignment(load, N, prev_node, config.node_stickiness, cost)


class _InterNodeLoads:
    """What a node assignment does to the inter-node traffic of a batch's loads counts [M, L, G, E]."""

    def __init__(self, counts: np.ndarray, topo: Topology, load: np.ndarray | None = None):
        """counts: [M, L, G, E]; load: counts summed over sources, [L, E, M], when at hand."""
        M, L, G, E = counts.shape
        self.shape = (L, M, G, E)
        self.topo = topo
        self.node_ranks = topo.node_ranks()                              # [N, g]
        N, g = self.node_ranks.shape
        # pairs from each node's sources to each expert, rows (node, layer, expert) of (micro-batch, source)
        by_node = _by_node(counts, self.node_ranks)                      # [M, L, N, g, E]
        self.to_expert = by_node.transpose(2, 1, 4, 0, 3).astype(np.float64).reshape(N * L * E, M * g)
        self.tokens = counts.sum(-1).transpose(1, 0, 2).astype(np.float64)   # [L, M, G] pairs each source sends
        if load is None:
            load = counts.sum(2).transpose(1, 2, 0)
        self.expert_load = load.transpose(0, 2, 1).astype(np.float64)  # [L, M, E]

    def __call__(self, node_of: np.ndarray):
        """node_of [C, L, E] -> pairs each source rank sends to other nodes [C, L, M, G], pairs each node
        receives from other nodes [C, L, M, N], and pairs each node computes [C, L, M, N]."""
        L, M, G, E = self.shape
        N, g = self.node_ranks.shape
        onehot = (node_of[..., None] == np.arange(N)).astype(np.float64)  # [C, L, E, N]
        C = onehot.shape[0]
        node_load = self.expert_load @ onehot                           # [C, L, M, N]
        to_expert = self.to_expert.reshape(N, L, E, M * g)
        kept = np.empty((C, L, M, N, g))                                 # stays on the source's node
        for n in range(N):  # per layer one [C, E] x [E, M * g] product: every candidate at once
            kept[:, :, :, n] = (onehot[..., n].transpose(1, 0, 2) @ to_expert[n]).transpose(1, 0, 2).reshape(C, L, M, g)
        sent = np.empty((C, L, M, G))
        ranks = self.node_ranks.reshape(-1)
        sent[..., ranks] = self.tokens[..., ranks] - kept.reshape(C, L, M, G)
        return sent, node_load - kept.sum(-1), node_load


def _node_cost(node_of: np.ndarray, load: np.ndarray, prev_node: np.ndarray, config: ReorderConfig,
               topo: Topology, inter: _InterNodeLoads | None = None) -> np.ndarray:
    """[C, L] cost of candidate node assignments node_of [C, L, E], in pairs: summed over micro-batches,
    (1 - share) x the busiest node's pairs per rank (GEMMs; replicas even out the ranks of a node) +
    share x the busiest NIC's pairs (the most a source rank sends to other nodes, or a node's inter-node
    receive per rank), share = config.inter_node_share (0 without `inter`); plus the moves' cost (moves
    run in parallel over the G ranks)."""
    N, g = topo.num_nodes, topo.G // topo.num_nodes
    moves = (node_of != prev_node[None]).sum(-1)                         # [C, L]
    share = config.inter_node_share if inter is not None else 0.0
    if share > 0:
        sent, recv, node_load = inter(node_of)
        nic = np.maximum(sent.max(-1) * g, recv.max(-1))                 # [C, L, M] g x the busiest NIC
        # integer sums (exact in any order), weighed once
        busy = ((1 - share) * node_load.max(-1).sum(-1) + share * nic.sum(-1)) / g
    else:
        busy = _busiest_bin(node_of, load, N).sum(-1) / g               # integer sums: exact in any order
    return busy + moves * config.move_cost_pairs / topo.G


def _fill_slots(rank_of_expert: np.ndarray, prev: np.ndarray, prev_home: np.ndarray, S: int) -> np.ndarray:
    """[L, E] target rank per expert -> [L, E] expert per home slot, keeping unmoved experts in place; a
    rank's free slots take its incoming experts in ascending slot and expert order."""
    L, E = rank_of_expert.shape
    out = np.empty((L, E), dtype=np.int64)
    _fill(np.ascontiguousarray(rank_of_expert, dtype=np.int64), np.ascontiguousarray(prev_home, dtype=np.int64), S, out)
    return out


@_jit
def _fill(rank_of_expert, prev_home, S, out):
    L, E = rank_of_expert.shape
    next_free = np.empty(E // S, dtype=np.int64)
    for l in range(L):
        out[l] = -1
        for e in range(E):
            if rank_of_expert[l, e] == prev_home[l, e] // S:
                out[l, prev_home[l, e]] = e
        for r in range(E // S):
            next_free[r] = r * S
        for e in range(E):
            r = rank_of_expert[l, e]
            if r != prev_home[l, e] // S:
                while out[l, next_free[r]] >= 0:
                    next_free[r] += 1
                out[l, next_free[r]] = e


def _placement_cost(load: np.ndarray, expert_at_home: np.ndarray, topo: Topology) -> np.ndarray:
    """[L] squared deviations from the mean of node loads plus those of rank loads, summed over
    micro-batches (lower is better; 0 is perfect balance in every micro-batch)."""
    L, E, M = load.shape
    per_slot = np.take_along_axis(load, expert_at_home[:, :, None], axis=1)   # [L, E(slot), M]
    rank_load = per_slot.reshape(L, topo.G, topo.S, M).sum(2)
    node_load = np.zeros((L, topo.num_nodes, M))
    np.add.at(node_load, (slice(None), np.asarray(topo.node_of_rank)), rank_load)
    node_dev = node_load - node_load.mean(1, keepdims=True)
    rank_dev = rank_load - rank_load.mean(1, keepdims=True)
    return (node_dev ** 2).sum((1, 2)) + (rank_dev ** 2).sum((1, 2))


def _placement_cost_compiled(load: np.ndarray, expert_at_home: np.ndarray, topo: Topology) -> np.ndarray:
    """_placement_cost, compiled."""
    out = np.empty(load.shape[0])
    reorder_kernels.placement_cost(load, np.ascontiguousarray(expert_at_home, dtype=np.int64),
                                   np.asarray(topo.node_of_rank, dtype=np.int64), topo.num_nodes, topo.S, out)
    return out


def _by_node(counts: np.ndarray, node_ranks: np.ndarray) -> np.ndarray:
    """counts [M, L, G, E] -> [M, L, N, g, E], the sources grouped by node (a view in Megatron's layout,
    where node n holds ranks n*g .. n*g+g-1)."""
    M, L, G, E = counts.shape
    N, g = node_ranks.shape
    if np.array_equal(node_ranks.reshape(-1), np.arange(G)):
        return counts.reshape(M, L, N, g, E)
    return counts[:, :, node_ranks]


def _home_rank(expert_at_home: np.ndarray, S: int) -> np.ndarray:
    """[L, E] rank holding each expert's home slot."""
    return invert_placement(expert_at_home) // S

