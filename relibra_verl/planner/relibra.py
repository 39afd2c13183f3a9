"""relibra's planner: per-batch expert reordering (placement) and per-micro-batch replication (quotas).

Both are pure numpy functions of (counts, previous placement, config), vectorized over layers and
micro-batches so a whole batch plans in milliseconds on one CPU core.

Reorder (once per batch, crosses nodes): each expert's load is a vector over the batch's micro-batches;
experts are packed heaviest first, each onto the node (then, inside the node, the rank) that adds least
to the sum of squared per-micro-batch loads, i.e. that keeps every micro-batch balanced, not just the
batch total, and expert swaps between the most different nodes (ranks) repair what the greedy left.
Node and rank labels are then matched to the previous placement so that as few experts as
possible change rank; a layer whose previous placement is already within `keep_tolerance` of the new
one keeps it (no moves).

Replicate (per micro-batch and layer, inside each node): pairs are of two kinds, from the home node
(NVLink, or no transfer at all) and from other nodes (InfiniBand: the busiest NIC sets the
all-to-all's time). The planner lowers the node's critical path, a weighted sum of its busiest rank's
GEMM work (pairs plus a fixed cost per GEMM call) and its busiest NIC, by moves of one home expert's
pairs of both kinds to a replica on another rank of the node (a free replica slot, no copy of that
expert yet), greedily, the best move first; the moves up to the lowest critical path are kept. Each
source rank's pairs are then split over the copies: of the intra-node kind, a replica holder's own
pairs first (they never leave the GPU), then the home node's sources in rank order; of the inter-node
kind, the other nodes' sources in rank order.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from relibra_verl.planner.types import BatchPlan, PlanError, Topology, identity_placement, invert_placement


@dataclasses.dataclass(frozen=True)
class ReplicationConfig:
    """Knobs of the replication planner.

    min_replica_tokens: a replica must carry at least this many pairs (time-aware planning sets it to
        the tokens that repay the replica's weight copy; see relibra_verl.sim).
    max_copies_per_owner: cap on replicas one owner rank sends per micro-batch and layer (None: R*(g-1)).
    tolerance: a problem stops once its objective is within this fraction of its lower bound (every
        rank at its node's mean).
    replica_overhead_pairs: what one more expert GEMM call costs its rank, in routed pairs of GEMM work
        (relibra_verl.sim.planning.replica_overhead_tokens); a home expert left without pairs frees its call.
    inter_node_share: the weight of the busiest InfiniBand NIC against the busiest rank's GEMM work in the
        objective: the share of a cross-node pair's cost that is its transfer
        (relibra_verl.sim.planning.inter_node_share, 0.78-0.90 for the presets on h100-ib400). No effect
        with one node.
    copy_cost_pairs: what a replica copy costs the rank that sends or receives most copies (the exposed
        part of its weight copies and gradient reduce), in routed pairs of GEMM work
        (relibra_verl.sim.planning.copy_cost_pairs). Charged to exchanges, which add no GEMM call, where
        they raise the node's busiest copier; a move's GEMM call is its cost. Exchanges are planned only
        with replica_overhead_pairs > 0 (without a call cost a move does as well).
    """

    min_replica_tokens: int = 1
    max_copies_per_owner: int | None = None
    tolerance: float = 0.002
    replica_overhead_pairs: float = 0.0
    inter_node_share: float = 0.8
    copy_cost_pairs: float = 0.0


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
        expert compute (relibra_verl.sim.planning.move_cost_pairs derives it from a hardware profile).
        When > 0, each layer takes, among node assignments of increasing stickiness and the previous
        one, the one with the least sum over micro-batches of (max node load / g) + moves / G * cost.
    inter_node_share: when > 0 (and counts are at hand), that choice also weighs each micro-batch's
        busiest InfiniBand NIC against the busiest node's GEMMs (_node_cost); costs planner time.
    rank_move_cost_pairs: the same for a move between ranks of one node (NVLink), in routed pairs on the
        busiest rank (relibra_verl.sim.planning.rank_move_cost_pairs). When > 0, each (layer, node) takes
        its rank assignment the same way (_assign_ranks).
    """

    keep_tolerance: float = 0.01
    max_moves_per_layer: int | None = None
    node_stickiness: float = 0.0
    rank_stickiness: float = 0.0
    move_cost_pairs: float = 0.0
    inter_node_share: float = 0.0
    rank_move_cost_pairs: float = 0.0


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
    stickiness = np.broadcast_to(np.asarray(stickiness, dtype=np.float64), (P,))
    per_bin = n // num_bins
    order = np.argsort(-weight.sum(-1), axis=1, kind="stable")
    mean_bin = weight.sum(1) / num_bins                                   # [P, D]
    bin_load = np.zeros((P, num_bins, D), dtype=np.float64)
    bin_items = np.zeros((P, num_bins), dtype=np.int64)
    bin_of_item = np.empty((P, n), dtype=np.int64)
    rows = np.arange(P)
    for i in range(n):
        item = order[:, i]
        w = weight[rows, item]                                            # [P, D]
        score = np.einsum("pbd,pd->pb", bin_load, w)                      # growth of sum of squares (halved)
        score = np.where(bin_items < per_bin, score, np.inf)
        b = np.argmin(score, axis=1)
        if prev_bin is not None and (stickiness > 0).any():
            pb = prev_bin[rows, item]
            slack = stickiness * np.einsum("pd,pd->p", w, mean_bin)
            stay = (pb >= 0) & (score[rows, np.maximum(pb, 0)] <= score[rows, b] + slack)
            b = np.where(stay, pb, b)
        bin_of_item[rows, item] = b
        bin_load[rows, b] += w
        bin_items[rows, b] += 1
    return bin_of_item


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
                   config: ReorderConfig = ReorderConfig(), total: np.ndarray | None = None) -> np.ndarray:
    """A new placement for the batch from its exact loads: nodes first, then ranks inside each node.

    counts: [M, L, G, E].  prev: [L, E] expert in each home slot (None: Megatron's identity).
    total: counts summed over ranks [M, L, E], when at hand.  Returns expert_at_home [L, E].
    """
    M, L, G, E = counts.shape
    S, N, g = topo.S, topo.num_nodes, topo.ranks_per_node
    prev = identity_placement(topo, L) if prev is None else np.asarray(prev, dtype=np.int64)
    total = counts.sum(axis=2) if total is None else total               # [M, L, E] pairs per expert
    load = total.transpose(1, 2, 0).astype(np.float64)                  # [L, E, M]
    node_ranks = topo.node_ranks()                                       # [N, g]
    rank_node = np.asarray(topo.node_of_rank)
    rank_pos = np.empty(G, dtype=np.int64)                               # position of a rank in its node
    rank_pos[node_ranks.reshape(-1)] = np.tile(np.arange(g), N)

    prev_home = invert_placement(prev)                                   # [L, E] home slot of each expert
    prev_rank = prev_home // S                                           # [L, E]

    # 1. experts -> nodes
    prev_node = rank_node[prev_rank]                                     # [L, E]
    if N > 1:
        node_of = _assign_nodes(load, N, prev_node, config, topo, counts)
    else:
        node_of = np.zeros((L, E), dtype=np.int64)

    # 2. inside each node: its g*S experts -> its g ranks
    members = np.argsort(node_of, axis=1, kind="stable").reshape(L, N, g * S)   # experts of each node
    member_load = np.take_along_axis(load, members.reshape(L, N * g * S)[:, :, None], axis=1)
    member_load = member_load.reshape(L * N, g * S, M)
    old_rank = prev_rank.reshape(L, E)[np.arange(L)[:, None], members.reshape(L, -1)].reshape(L * N, g * S)
    same_node = rank_node[old_rank] == np.repeat(np.arange(N)[None], L, 0).reshape(L * N, 1)
    old_pos = np.where(same_node, rank_pos[old_rank], -1)
    if g > 1:
        pos_of = _assign_ranks(member_load, g, old_pos, config)
    else:
        pos_of = np.zeros((L * N, g * S), dtype=np.int64)
    rank_of = node_ranks[np.repeat(np.tile(np.arange(N), L)[:, None], g * S, 1), pos_of]   # [L*N, g*S]

    # 3. home slots: experts that stay on their rank keep their local slot, the rest fill the gaps
    rank_of_expert = np.empty((L, E), dtype=np.int64)
    np.put_along_axis(rank_of_expert, members.reshape(L, -1), rank_of.reshape(L, -1), axis=1)
    new = _fill_slots(rank_of_expert, prev, prev_home, S)

    # 4. keep the old placement where the new one is not clearly better (or moves too much)
    moves = (rank_of_expert != prev_rank).sum(1)
    keep = _placement_cost(load, prev, topo) <= _placement_cost(load, new, topo) * (1 + config.keep_tolerance)
    if config.max_moves_per_layer is not None:
        keep |= moves > config.max_moves_per_layer
    return np.where(keep[:, None], prev, new)


def _assign_ranks(load: np.ndarray, g: int, old_pos: np.ndarray, config: ReorderConfig) -> np.ndarray:
    """Each node's experts -> its g ranks. load: [P, n, M] per (layer, node) problem, its n = g*S experts'
    per-micro-batch loads; old_pos: [P, n] each expert's previous rank position in the node (-1: it
    comes from another node). Returns pos_of [P, n] (S experts per position).

    Without a move cost: one greedy packing at config.rank_stickiness, refined by swaps. With
    config.rank_move_cost_pairs > 0, like _assign_nodes: among packings of increasing stickiness and the
    previous assignment (where the node kept its experts), then the refining swap steps on the chosen
    one, the one with the least _rank_cost (busiest rank per micro-batch plus the busiest rank's arrivals)."""
    cost = None
    if config.rank_move_cost_pairs > 0:
        cost = lambda cand: _rank_cost(cand, load, old_pos, g, config.rank_move_cost_pairs, config.move_cost_pairs)
    return _cheapest_assignment(load, g, old_pos, config.rank_stickiness, cost)


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
    onehot = (pos_of[..., None] == np.arange(g)).astype(np.float64)     # [C, P, n, g]
    busy = np.einsum("cpng,pnm->cpgm", onehot, load).max(axis=2).sum(-1)
    moved = (pos_of != old_pos[None]) & (old_pos[None] >= 0)             # [C, P, n] over NVLink
    arrived = np.broadcast_to(old_pos[None] < 0, pos_of.shape)           # from another node
    nvl_in = np.einsum("cpng,cpn->cpg", onehot, moved.astype(np.float64))
    ib_in = np.einsum("cpng,cpn->cpg", onehot, arrived.astype(np.float64))
    return busy + np.maximum(nvl_in * move_cost, ib_in * arrival_cost).max(-1)


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
    per = E // N
    rows = np.arange(L)
    sq = np.einsum("lem,lem->le", load, load)                             # |w_e|^2
    threshold = 1e-6 * np.maximum(sq.sum(1), 1)                          # ignore swaps worth ~nothing
    members = np.argsort(node_of, axis=1, kind="stable").reshape(L, N, per)   # experts of each node
    node_load = np.take_along_axis(load, members.reshape(L, E)[:, :, None], axis=1).reshape(L, N, per, M).sum(2)
    node_col = np.repeat(np.arange(N), per)[None].repeat(L, 0)

    def assignment():
        out = np.empty_like(node_of)
        np.put_along_axis(out, members.reshape(L, E), node_col, axis=1)
        return out

    steps = [node_of] if every_step else []
    for _ in range(iters):
        dev = node_load - node_load.mean(1, keepdims=True)               # [L, N, M]
        dd = dev @ dev.transpose(0, 2, 1)                                 # [L, N, N] dev_h . dev_k
        norm = np.einsum("lnn->ln", dd)
        far = norm[:, :, None] + norm[:, None, :] - 2 * dd               # |dev_h - dev_k|^2
        h, k = np.divmod(np.argmax(far.reshape(L, N * N), axis=1), N)
        delta = dev[rows, h] - dev[rows, k]                               # [L, M]
        a_all, b_all = members[rows, h], members[rows, k]                 # [L, per] experts on h, on k
        load_a = np.take_along_axis(load, a_all[:, :, None], 1)           # [L, per, M]
        load_b = np.take_along_axis(load, b_all[:, :, None], 1)
        proj_a = (load_a @ delta[:, :, None])[:, :, 0]
        proj_b = (load_b @ delta[:, :, None])[:, :, 0]
        cross = load_a @ load_b.transpose(0, 2, 1)                        # [L, per, per]
        # gain of swapping a (on h) with b (on k): 2 (w_a - w_b).delta - 2 |w_a - w_b|^2
        gain = 2 * (proj_a[:, :, None] - proj_b[:, None, :]) - 2 * (
            np.take_along_axis(sq, a_all, 1)[:, :, None] + np.take_along_axis(sq, b_all, 1)[:, None, :] - 2 * cross)
        best = np.argmax(gain.reshape(L, per * per), axis=1)
        i, j = np.divmod(best, per)
        do = rows[gain[rows, i, j] > threshold]
        if not len(do):
            break
        a, b = a_all[do, i[do]], b_all[do, j[do]]
        w = load[do, a] - load[do, b]                                     # [D, M] what h sheds, k gains
        node_load[do, h[do]] -= w
        node_load[do, k[do]] += w
        members[do, h[do], i[do]], members[do, k[do], j[do]] = b, a
        if every_step:
            steps.append(assignment())
    return np.stack(steps) if every_step else assignment()


def _assign_nodes(load: np.ndarray, N: int, prev_node: np.ndarray, config: ReorderConfig,
                  topo: Topology, counts: np.ndarray | None = None) -> np.ndarray:
    """Experts -> nodes for every layer. load: [L, E, M]; prev_node: [L, E]; counts: [M, L, G, E] (for the
    inter-node terms). Returns node_of [L, E].

    With neither a move cost nor an inter-node share: one greedy packing at config.node_stickiness,
    refined by swaps. Otherwise, per layer, the cheapest of several stickiness levels and of keeping the
    previous assignment, then of the refining swap steps on it, where cost = _node_cost: per micro-batch
    the busiest node's pairs per rank and (inter_node_share > 0) the busiest NIC, plus the moves' cost
    (moves run in parallel over the G ranks; _cheapest_assignment). The candidates balance pairs; the cost
    picks among them the one whose sends and receives across nodes are most even."""
    cost = None
    if config.move_cost_pairs > 0 or config.inter_node_share > 0:
        inter = None if counts is None or config.inter_node_share <= 0 else _InterNodeLoads(np.asarray(counts), topo, load)
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
        nic = np.maximum(sent.max(-1), recv.max(-1) / g)                 # [C, L, M]
        busy = (1 - share) * node_load.max(-1) / g + share * nic
    else:
        onehot = node_of[..., None] == np.arange(N)                      # [C, L, E, N]
        busy = np.einsum("clen,lem->clnm", onehot, load).max(axis=2) / g
    return busy.sum(-1) + moves * config.move_cost_pairs / topo.G


def _fill_slots(rank_of_expert: np.ndarray, prev: np.ndarray, prev_home: np.ndarray, S: int) -> np.ndarray:
    """[L, E] target rank per expert -> [L, E] expert per home slot, keeping unmoved experts in place."""
    L, E = rank_of_expert.shape
    out = np.full((L, E), -1, dtype=np.int64)
    stays = rank_of_expert == prev_home // S
    for l in range(L):
        out[l, prev_home[l, stays[l]]] = np.flatnonzero(stays[l])
        movers = np.flatnonzero(~stays[l])
        if len(movers):
            free = np.flatnonzero(out[l] < 0)
            # a rank's free slots take its incoming experts in ascending expert order
            order = np.lexsort((movers, rank_of_expert[l, movers]))
            out[l, free] = movers[order]
    return out


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


def plan_replicas(counts: np.ndarray, topo: Topology, expert_at_home: np.ndarray,
                  config: ReplicationConfig = ReplicationConfig(),
                  total: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Replicas and quotas for every (micro-batch, layer), inside each node.

    Each (micro-batch, layer, node) is one problem; its ranks' state is, in routed pairs,
      T_r  GEMM work: pairs computed + replica_overhead_pairs per GEMM call (a copy that computes pairs),
      R_r  pairs received from other nodes (InfiniBand: the busiest NIC sets the all-to-all's time),
    and the objective is the problem's critical path (`_ReplicaState.objective`):
      J = (1 - s) * max T + s * max(max R, F),
    s = inter_node_share, F = the most any rank of the layer sends to other nodes (replication inside a
    node cannot lower it). Greedy: each step makes the move of one home expert's pairs from its home
    rank to a replica on another rank of the node that lowers J most (of moves that lower it about as
    much, the largest: replica slots are few; a move that leaves J unchanged can still resolve a tie at
    the maximum for the next one), or, where it lowers J more, an exchange: two ranks' home experts
    trade places for the micro-batch, each as a replica with all of the other's remaining pairs, which
    adds no GEMM call (_best_exchange); a move takes
    the pairs of each kind (from other nodes, from the home node) that bring the two ranks towards the
    node's means (_best_move). The steps up to the lowest J are kept: no problem ends above its
    unreplicated J; and a node that does not set its layer's time keeps only the steps that bring it
    under the layer's busiest rank and NIC (_shortest_equal_prefix): its other replicas would cost
    copies and GEMM calls for nothing.

    counts: [M, L, G, E]; expert_at_home: [L, E]; total: counts summed over ranks [M, L, E], when at hand.
    Returns replica_expert [M, L, G, R] (-1 empty) and replica_quota [M, L, G, R, G_src].
    """
    M, L, G, E = counts.shape
    S, R, N, g = topo.S, topo.R, topo.num_nodes, topo.ranks_per_node
    replica_expert = np.full((M, L, G, R), -1, dtype=np.int64)
    replica_quota = np.zeros((M, L, G, R, G), dtype=np.int32)
    if R == 0 or g == 1:
        return replica_expert, replica_quota
    node_ranks = topo.node_ranks()                                       # [N, g]
    P = M * L * N

    def per_node_slot(x):  # [M, L, E] per expert -> [P, g, S] per home slot of each node's ranks
        at_slot = np.take_along_axis(x, np.broadcast_to(expert_at_home, (M, L, E)), axis=2)
        return at_slot.reshape(M, L, G, S)[:, :, node_ranks].reshape(P, g, S).astype(np.int32)

    total = counts.sum(axis=2) if total is None else total               # [M, L, E]
    home_l = per_node_slot(_same_node_pairs(counts, topo, expert_at_home) if N > 1 else total)   # from the home node
    home_r = per_node_slot(total) - home_l                               # from other nodes (left at home)
    overhead = float(config.replica_overhead_pairs)
    share = float(config.inter_node_share) if N > 1 else 0.0
    state = _ReplicaState(
        T=(home_r + home_l).sum(-1, dtype=np.float64) + overhead * ((home_r + home_l) > 0).sum(-1),
        R=home_r.sum(-1, dtype=np.float64),
        floor=np.repeat(_inter_node_sent_max(counts, topo, expert_at_home), N) if N > 1 else np.zeros(P),
        share=share)
    # moves only, and (with a GEMM-call cost) moves and exchanges; each problem keeps the run that ends
    # lower (greedy either way: exchanges gain more at once, and sometimes leave less to gain after)
    runs = [_greedy_replicas(state, home_r, home_l, config, R, exchanges=False)]
    if overhead > 0:
        runs.append(_greedy_replicas(state, home_r, home_l, config, R, exchanges=True))
    chosen = np.argmin(np.stack([r.best_j for r in runs]), axis=0)      # [P] ties: moves only
    K = max(len(r.peak_T) for r in runs)
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], K - len(x), axis=0)])
    cols = np.arange(P)
    peak_T = np.stack([pad(r.peak_T) for r in runs])[chosen, :, cols].T  # [K, P]
    peak_R = np.stack([pad(r.peak_R) for r in runs])[chosen, :, cols].T
    best_steps = np.stack([r.best_steps for r in runs])[chosen, cols]
    if N > 1:  # a node that does not set its layer's time needs only the replicas that keep it so
        best_steps = _shortest_equal_prefix(peak_T, peak_R, best_steps, state.floor, N)
    # keep each problem's steps of its run up to its lowest objective
    picks = [tuple(x[(best_steps[pk[0]] > step) & (chosen[pk[0]] == i)] for x in pk)
             for i, r in enumerate(runs) for step, pk in zip(r.steps_of, r.picks)]
    picks = [pk for pk in picks if len(pk[0])]
    if not picks:
        return replica_expert, replica_quota
    p, d, sl, rv, k, a, y = (np.concatenate(c) for c in zip(*picks))
    m, rest = np.divmod(p, L * N)
    l, n = np.divmod(rest, N)
    donor_rank, holder = node_ranks[n, d], node_ranks[n, rv]
    expert = expert_at_home[l, donor_rank * S + sl]
    replica_expert[m, l, holder, k] = expert
    key = (m * L + l) * E + expert
    # each expert's per-source pairs, gathered once per expert (a flat take: [n, G] indices)
    flat = counts.reshape(-1)
    src_of = lambda idx: flat[(((m[idx] * L + l[idx]) * G)[:, None] + np.arange(G)) * E + expert[idx][:, None]]
    replica_quota[m, l, holder, k] = _split_quota(src_of, holder, donor_rank, a, y, key, topo)
    return replica_expert, replica_quota


@dataclasses.dataclass
class _GreedyRun:
    """One greedy replication run over all problems (plan_replicas)."""

    picks: list            # (problems, donor, slot, receiver, replica slot k, amount, inter-node part)
    steps_of: list         # the step of each entry of picks
    best_j: np.ndarray     # [P] lowest objective reached
    best_steps: np.ndarray  # [P] steps up to it
    peak_T: np.ndarray     # [steps + 1, P] busiest rank's GEMM work after each step
    peak_R: np.ndarray     # [steps + 1, P] busiest inter-node receive after each step


def _greedy_replicas(state0: "_ReplicaState", home_r0: np.ndarray, home_l0: np.ndarray, config: "ReplicationConfig",
                     R: int, exchanges: bool) -> _GreedyRun:
    """The greedy of plan_replicas on copies of its state: state0 (T, R per rank), home_r0 / home_l0 [P, g, S]
    pairs at each home slot; R replica slots per rank; exchanges: also consider exchanges."""
    P, g, S = home_r0.shape
    state = dataclasses.replace(state0, T=state0.T.copy(), R=state0.R.copy())
    home_r, home_l = home_r0.copy(), home_l0.copy()
    overhead, share, multi = float(config.replica_overhead_pairs), state.share, state.share > 0 or state.R.any()
    # [problem, node-local expert (donor * S + slot), rank]: the rank cannot take the expert (holds a copy, or
    # has no free slot)
    blocked = np.zeros((P, g * S, g), dtype=bool)
    blocked[:, np.arange(g * S), np.arange(g).repeat(S)] = True
    used = np.zeros((P, g), dtype=np.int64)                              # replica slots taken
    sent = np.zeros((P, g), dtype=np.int64)                              # replicas each owner sends
    cap = R * (g - 1) if config.max_copies_per_owner is None else config.max_copies_per_owner
    min_tokens = max(1, int(config.min_replica_tokens))
    best_j = state.objective(np.arange(P))
    best_steps = np.zeros(P, dtype=np.int64)
    done_j = state.lower_bound() * (1 + config.tolerance)                # close enough to the bound: stop
    picks, steps_of = [], []
    live = np.flatnonzero(best_j > done_j)                               # problems still improving
    peaks = [state.peaks()]                                              # (max T, max R) after each step
    step = 0

    def apply_pick(p, d, sl, rv, a, y):
        """Replicas of (problem p, donor d's home slot sl) on rv taking a pairs, y of them inter-node."""
        picks.append((p, d, sl, rv, used[p, rv], a, y))
        steps_of.append(step)
        home_r[p, d, sl] -= y.astype(np.int32)
        home_l[p, d, sl] -= (a - y).astype(np.int32)
        emptied = (home_r[p, d, sl] + home_l[p, d, sl]) == 0             # the home copy's GEMM call goes
        state.T[p, d] -= a + overhead * emptied
        state.T[p, rv] += a + overhead
        state.R[p, d] -= y
        state.R[p, rv] += y
        sent[p, d] += 1
        used[p, rv] += 1
        blocked[p, d * S + sl, rv] = True
        full = used[p, rv] == R
        blocked[p[full], :, rv[full]] = True

    for step in range(g * R):
        if not len(live):
            break
        # only a move off a busiest rank lowers J: the donor is the rank with the most GEMM work or the
        # one with the most inter-node pairs
        donors = np.stack([state.T[live].argmax(-1), state.R[live].argmax(-1)], axis=1) if multi \
            else state.T[live].argmax(-1)[:, None]                       # [n, D]
        at = (live[:, None], donors)
        d, sl, rv, a, y, go, score = _best_move(state, live, donors, home_r[at], home_l[at],
                                                blocked.reshape(P, g, S, g)[at], sent[at] >= cap, R - used[live],
                                                overhead, min_tokens)
        moves = [(d, sl, rv, a, y, go)]
        if exchanges:
            # one donor for exchanges (their search is the costly one): the busiest rank of the term,
            # GEMM work or NIC, whose excess weighs more in J
            exd = donors
            if multi:
                Tl, Rl, fl = state.T[live], state.R[live], state.floor[live]
                e_t = (1 - share) * (Tl.max(-1) - Tl.mean(-1))
                e_r = share * (np.maximum(Rl.max(-1), fl) - np.maximum(Rl.mean(-1), fl))
                exd = np.where(e_t >= e_r, donors[:, 0], donors[:, 1])[:, None]
            ed, ea, er, eb, ua, ya, ub, yb, ex_score, ex_ok = _best_exchange(
                state, live, exd, home_r[live], home_l[live], blocked[live], np.maximum(used[live], sent[live]),
                R - used[live], sent[live] >= cap, min_tokens, float(config.copy_cost_pairs))
            swap = ex_ok & (ex_score > score)                            # an exchange beats the best move
            go &= ~swap
            # an exchange is two replica picks, each holding all of the other's remaining pairs
            moves += [(ed, ea, er, ua, ya, swap), (er, eb, ed, ub, yb, swap)]
            go = go | swap
        if not go.any():
            break
        for *move, ok in moves:
            if ok.any():
                apply_pick(live[ok], *(x[ok] for x in move))
        p = live[go]
        j = state.objective(p)
        better = j < best_j[p] - 1e-9
        best_j[p[better]] = j[better]
        best_steps[p[better]] = step + 1
        live = p[j > done_j[p]]
        peaks.append(state.peaks())
    return _GreedyRun(picks, steps_of, best_j, best_steps, np.stack([pk[0] for pk in peaks]),
                      np.stack([pk[1] for pk in peaks]))


@dataclasses.dataclass
class _ReplicaState:
    """The replication problems' rank state, [P, g] each (see plan_replicas)."""

    T: np.ndarray           # GEMM work: pairs + overhead per GEMM call
    R: np.ndarray           # pairs received from other nodes
    floor: np.ndarray       # [P] the most any rank of the layer sends to other nodes
    share: float            # inter_node_share

    def objective(self, idx: np.ndarray) -> np.ndarray:
        """[len(idx)] J of problems idx: (1 - s) max T + s max(max R, F)."""
        nic = np.maximum(self.R[idx].max(-1), self.floor[idx])
        return (1 - self.share) * self.T[idx].max(-1) + self.share * nic

    def peaks(self) -> tuple[np.ndarray, np.ndarray]:
        """[P] max T and max R of every problem."""
        return self.T.max(-1), self.R.max(-1)

    def lower_bound(self) -> np.ndarray:
        """[P] J with every rank at its node's mean and no copies (replicas only add GEMM calls)."""
        return (1 - self.share) * self.T.mean(-1) + self.share * np.maximum(self.R.mean(-1), self.floor)


def _shortest_equal_prefix(peak_T: np.ndarray, peak_R: np.ndarray, best_steps: np.ndarray, floor: np.ndarray,
                           N: int) -> np.ndarray:
    """Fewer steps for the nodes that do not set their layer's time: each node's shortest prefix of its
    steps whose busiest rank and NIC stay within the layer's maxima (over its nodes, at their best
    prefixes). peak_T, peak_R: [steps + 1, P] after each step (P = layers x N, node fastest);
    best_steps: [P]. Returns steps to keep [P]."""
    K, P = peak_T.shape
    cols = np.arange(P)
    T_star = peak_T[best_steps, cols].reshape(-1, N).max(1).repeat(N)
    R_star = np.maximum(peak_R[best_steps, cols].reshape(-1, N).max(1).repeat(N), floor)
    ok = (peak_T <= T_star + 1e-6) & (peak_R <= R_star + 1e-6) & (np.arange(K)[:, None] <= best_steps)
    return np.argmax(ok, axis=0)


def _max_excluding(v: np.ndarray, donors: np.ndarray) -> np.ndarray:
    """v [n, g], donors [n, D] -> [n, D, g]: entry (i, r) is the largest v over the ranks other than
    donors[:, i] and r (-inf if none)."""
    n, g = v.shape
    order = np.argsort(-v, axis=1, kind="stable")[:, :3]
    top = np.take_along_axis(v, order, axis=1)
    if g < 3:
        top = np.concatenate([top, np.full((n, 3 - top.shape[1]), -np.inf, dtype=v.dtype)], axis=1)
        order = np.concatenate([order, np.full((n, 3 - order.shape[1]), -1)], axis=1)
    d, r = donors[:, :, None], np.arange(g)[None, None, :]
    hit = [(order[:, i, None, None] == d) | (order[:, i, None, None] == r) for i in range(2)]
    return np.where(~hit[0], top[:, 0, None, None], np.where(~hit[1], top[:, 1, None, None], top[:, 2, None, None]))


def _best_move(state: _ReplicaState, live: np.ndarray, donors: np.ndarray, home_r: np.ndarray, home_l: np.ndarray,
               blocked: np.ndarray, capped: np.ndarray, free_slots: np.ndarray, overhead: float, min_tokens: int):
    """The best move of each live problem: from one of its donors d, every (home slot of d, receiver r)
    of the node, with the amounts that bring d and r towards the node's means (below), scored by how
    much it lowers J and, secondarily, by its size (score_of).

    donors: [n, D] ranks (in the node); home_r, home_l: [n, D, S] pairs left at the donors' home slots
    (from other nodes, from the home node); blocked: [n, D, S, g] (the receiver holds a copy or has no
    free slot); capped: [n, D] donors at their copy cap; free_slots: [n, g].
    Returns donor, slot, receiver, amount, inter-node part, go (a move lowers J, or keeps it and moves
    pairs) and the score ([n] each).
    """
    n, D, S = home_r.shape
    g = free_slots.shape[1]
    s = state.share
    rows = np.arange(n)
    f32 = np.float32                                                     # exact for pair counts < 2**24
    T, Rr = state.T[live].astype(f32), state.R[live].astype(f32)         # [n, g]
    pick = lambda x: x[rows[:, None], donors]                            # [n, g] -> [n, D]
    floor = state.floor[live].astype(f32)[:, None, None, None]
    # axes: [n, donor, slot, receiver]
    Td, Tr = pick(T)[:, :, None, None], T[:, None, None, :]
    Rd, Rr_ = pick(Rr)[:, :, None, None], Rr[:, None, None, :]
    hr = home_r[..., None].astype(f32)
    hl = home_l[..., None].astype(f32)
    # Amounts, towards the node's means. Rule "per kind": pairs from other nodes fill the receiver's R up
    # to the mean, as far as the donor is above it; the rest (GEMM work T less R) likewise, less the
    # receiver's new GEMM call. Rule "GEMM work": the amount fills the receiver's T, of any kind (as many
    # from other nodes as the first rule takes, within it): where no NIC is near the critical path,
    # the kinds need no balance of their own. In either, a receiver too close to the mean may still take
    # work above it, up to where it meets the donor, as long as the donor stays above the mean; a
    # receiver's last free slot takes as much as fills it (the donor has free slots of its own to be
    # refilled, the receiver would have none). A receiver is never pushed far above the mean: it cannot
    # shed a replica. The better-scoring rule is taken.
    last = (free_slots == 1)[:, None, None, :]

    def towards_mean(have_d, have_r, mean):
        excess = np.maximum(have_d - mean, 0)
        deficit = mean - have_r - overhead
        meet = (have_d - have_r - overhead) / 2
        return np.where(deficit >= min_tokens, np.minimum(deficit, np.where(last, np.inf, excess)),
                        np.minimum(meet, excess))

    r_mean = Rr.mean(-1)[:, None, None, None]
    clip = lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi)          # (np.clip is slower on small arrays)
    y_kind = np.floor(clip(np.minimum(r_mean - Rr_, Rd - r_mean), 0, hr))
    u_kind = y_kind + np.floor(clip(towards_mean(Td - Rd, Tr - Rr_, (T - Rr).mean(-1)[:, None, None, None]), 0, hl))
    u_work = np.floor(clip(towards_mean(Td, Tr, T.mean(-1)[:, None, None, None]), 0, hr + hl))
    y_work = clip(y_kind, u_work - hl, np.minimum(u_work, hr))
    T_other = _max_excluding(T, donors)[:, :, None, :]
    R_other = _max_excluding(Rr, donors)[:, :, None, :]
    j_now = state.objective(live).astype(f32)[:, None, None, None]

    def score_of(u, y):
        """J's drop, plus 0.001 per pair moved: of moves that lower J about as much, the largest (the
        donor sheds more for the replica slot it uses)."""
        shed = u + np.where(u >= hr + hl, f32(overhead), f32(0))         # the home copy computes nothing
        T_new = np.maximum(np.maximum(Td - shed, Tr + u + f32(overhead)), T_other)
        R_new = np.maximum(np.maximum(np.maximum(Rd - y, Rr_ + y), R_other), floor)
        return (j_now - f32(1 - s) * T_new - f32(s) * R_new) + f32(1e-3) * u

    score_kind, score_work = score_of(u_kind, y_kind), score_of(u_work, y_work)
    work = score_work > score_kind
    u, y = np.where(work, u_work, u_kind), np.where(work, y_work, y_kind)
    score = np.maximum(score_kind, score_work)
    bad = blocked | (u < min_tokens) | capped[:, :, None, None]
    score = np.where(bad, -np.inf, score)
    best = np.argmax(score.reshape(n, -1), axis=1)
    i, rest = np.divmod(best, S * g)
    sl, rv = np.divmod(rest, g)
    best_score = score[rows, i, sl, rv]
    go = best_score > 1e-6 * j_now[:, 0, 0, 0]
    return (donors[rows, i], sl, rv, u[rows, i, sl, rv].astype(np.int64), y[rows, i, sl, rv].astype(np.int64),
            go, best_score)


def _best_exchange(state: _ReplicaState, live: np.ndarray, donors: np.ndarray, home_r: np.ndarray,
                   home_l: np.ndarray, blocked: np.ndarray, copies: np.ndarray, free_slots: np.ndarray,
                   capped: np.ndarray, min_tokens: int, copy_cost: float):
    """The best exchange of each live problem: a donor d's home expert a and another rank r's home expert b
    trade places for the micro-batch, each as a replica that takes all of the other's remaining pairs. Both
    home copies then run no GEMM, so unlike a move no call is added; it costs two copies. For each
    (d, a, r) the b whose pairs best even out d and r is taken. Scored like a move, less the copies'
    exposed cost where the exchange raises the node's busiest copier (copy_cost, in pairs of GEMM work).

    home_r, home_l: [n, g, S] pairs left at every home slot; blocked: [n, g * S, g]; copies: [n, g] copies
    each rank receives or sends (the larger); free_slots, capped: [n, g]. Returns d, a, r, b ([n] each),
    the amounts (all, inter-node part) of a and of b, the score and ok ([n])."""
    n, g, S = home_r.shape
    s = state.share
    rows = np.arange(n)
    f32 = np.float32
    T, Rr = state.T[live].astype(f32), state.R[live].astype(f32)          # [n, g]
    pick = lambda x: x[rows[:, None], donors]                             # [n, g, ...] -> [n, D, ...]
    left = (home_r + home_l).astype(f32)                                  # [n, g, S]
    # axes [n, D (d), S (a), g (r)]
    uA, yA = pick(left)[..., None], pick(home_r).astype(f32)[..., None]
    Td, Tr = pick(T)[:, :, None, None], T[:, None, None, :]
    Rd, Rr_ = pick(Rr)[:, :, None, None], Rr[:, None, None, :]
    bl = blocked.reshape(n, g, S, g)                                      # [n, rank, slot, receiver]
    # b on r: d must be able to take it; of those, the one that brings d and r closest together
    b_ok = ~np.take_along_axis(bl, donors[:, None, None, :], axis=3).transpose(0, 3, 1, 2)   # [n, D, g, S]
    b_ok &= left[:, None] >= min_tokens
    want = (uA - (Td - Tr) / 2)[..., None]                                # [n, D, S, g, 1]: d and r even
    miss = np.where(b_ok[:, :, None], np.abs(left[:, None, None] - want), np.inf)
    b = np.argmin(miss, axis=-1)                                          # [n, D, S, g]
    b_found = np.isfinite(miss.min(axis=-1))
    r_idx = np.arange(g)[None, None, None, :]
    uB = left[rows[:, None, None, None], r_idx, b]
    yB = home_r.astype(f32)[rows[:, None, None, None], r_idx, b]
    T_new = np.maximum(np.maximum(Td - uA + uB, Tr - uB + uA), _max_excluding(T, donors)[:, :, None, :])
    R_new = np.maximum(np.maximum(np.maximum(Rd - yA + yB, Rr_ - yB + yA), _max_excluding(Rr, donors)[:, :, None, :]),
                       state.floor[live].astype(f32)[:, None, None, None])
    C = copies.astype(f32)
    C_new = np.maximum(np.maximum(pick(C)[:, :, None, None], C[:, None, None, :]) + 1, _max_excluding(C, donors)[:, :, None, :])
    raised = C_new - C.max(-1)[:, None, None, None]
    j_now = state.objective(live).astype(f32)[:, None, None, None]
    score = (j_now - f32(1 - s) * T_new - f32(s) * R_new) + f32(1e-3) * np.abs(uA - uB) \
        - f32((1 - s) * copy_cost) * raised
    bad = bl[rows[:, None], donors] | (uA < min_tokens) | ~b_found \
        | (pick(free_slots) == 0)[:, :, None, None] | (free_slots == 0)[:, None, None, :] \
        | pick(capped)[:, :, None, None] | capped[:, None, None, :]
    score = np.where(bad, -np.inf, score)
    best = np.argmax(score.reshape(n, -1), axis=1)
    i, rest = np.divmod(best, S * g)
    a, r = np.divmod(rest, g)
    d, bb = donors[rows, i], b[rows, i, a, r]
    sc = score[rows, i, a, r]
    ok = sc > 1e-6 * j_now[:, 0, 0, 0]
    hrA, hrB = home_r[rows, d, a].astype(np.int64), home_r[rows, r, bb].astype(np.int64)
    return d, a, r, bb, hrA + home_l[rows, d, a], hrA, hrB + home_l[rows, r, bb], hrB, sc, ok


def _inter_node_sent_max(counts: np.ndarray, topo: Topology, expert_at_home: np.ndarray) -> np.ndarray:
    """[M * L] the most pairs any rank sends to experts homed on other nodes, per (micro-batch, layer)."""
    node = np.asarray(topo.node_of_rank)
    home_node = node[_home_rank(expert_at_home, topo.S)]                  # [L, E]
    cross = node[None, :, None] != home_node[:, None, :]                  # [L, G, E]
    sent = np.einsum("mlge,lge->mlg", counts, cross.astype(counts.dtype))
    return sent.max(-1).reshape(-1).astype(np.float64)


def _same_node_pairs(counts: np.ndarray, topo: Topology, expert_at_home: np.ndarray) -> np.ndarray:
    """[M, L, E] pairs each expert receives from the sources of its home node.

    counts: [M, L, G, E]; expert_at_home: [L, E]."""
    M, L, G, E = counts.shape
    from_node = _by_node(counts, topo.node_ranks()).sum(3)               # [M, L, N, E]
    home_node = np.asarray(topo.node_of_rank)[_home_rank(expert_at_home, topo.S)]   # [L, E]
    return np.take_along_axis(from_node, np.broadcast_to(home_node[None, :, None], (M, L, 1, E)), axis=2)[:, :, 0]


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


def _group_cumsum(x: np.ndarray, group_start: np.ndarray) -> np.ndarray:
    """Inclusive running sum of x within consecutive groups (group_start marks each group's first entry)."""
    csum = np.cumsum(x)
    first = np.maximum.accumulate(np.where(group_start, np.arange(len(x)), 0))
    return csum - (csum[first] - x[first])


def _interval_take(pool: np.ndarray, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Northwest-corner rule: lay the sources of a row end to end in rank order; an entry takes the pairs
    of each source that fall in its interval [begin, end).

    pool: [n, G] pairs of each source; begin, end: [n].  Returns take [n, G] (pool's dtype).
    """
    hi = np.cumsum(pool, axis=1, dtype=pool.dtype)
    lo = hi - pool
    np.maximum(lo, begin[:, None].astype(pool.dtype), out=lo)
    np.minimum(hi, end[:, None].astype(pool.dtype), out=hi)
    hi -= lo
    np.maximum(hi, 0, out=hi)
    return hi


def _split_quota(src_of, holder: np.ndarray, home_rank: np.ndarray, amount: np.ndarray,
                 inter_node: np.ndarray, key: np.ndarray, topo: Topology) -> np.ndarray:
    """Split each replica's amount over source ranks.

    src_of(idx) -> [len(idx), G]: pairs of each source rank for the experts of replicas idx;
    holder, home_rank, amount: [K]; inter_node: [K] how many of the amount come from other nodes than
    the home's (the planner's choice, <= what they send); key: [K] names the replica's (micro-batch,
    layer, expert): replicas of one expert share its sources.
    The home keeps what the replicas do not take, of both kinds. Every copy takes its inter-node pairs
    from the other nodes' sources in rank order (which source does not change any NIC's load), and its
    intra-node pairs from its own rank first (they never leave the GPU), then from the home node's
    sources in rank order.
    Returns quota [K, G] with quota.sum(1) == amount and, per expert, column sums <= src.
    """
    K = len(holder)
    order = np.lexsort((holder, key))
    key_s = key[order]
    new_group = np.r_[True, key_s[1:] != key_s[:-1]]
    gid = np.cumsum(new_group) - 1                                         # [K] group of each sorted replica
    n_groups = int(gid[-1]) + 1
    src_g = src_of(order[new_group]).astype(np.int32)                     # [n_groups, G] (int32: half the traffic)
    G = src_g.shape[1]
    home_g = home_rank[order][new_group]
    groups = np.arange(n_groups)
    node_ranks = topo.node_ranks()                                        # [N, g]
    N, g = node_ranks.shape
    home_node = np.asarray(topo.node_of_rank)[home_g]
    remote_pool = src_g.sum(1, dtype=np.int64) - src_g[groups[:, None], node_ranks[home_node]].sum(1, dtype=np.int64)
    # entries, group by group: its replicas (sorted), then its home copy. Sorted replica i sits at
    # position i + gid[i]; the home of group g right after the group's last replica.
    n = K + n_groups
    rep_pos = np.arange(K) + gid
    home_pos = np.r_[np.flatnonzero(new_group)[1:], K] + np.arange(n_groups)
    e_gid = np.empty(n, dtype=np.int64)
    e_gid[rep_pos], e_gid[home_pos] = gid, groups
    e_holder = np.empty(n, dtype=np.int64)
    e_holder[rep_pos], e_holder[home_pos] = holder[order], home_g
    e_amount = np.empty(n, dtype=np.int64)
    e_amount[rep_pos] = amount[order]
    e_amount[home_pos] = src_g.sum(1, dtype=np.int64) - np.bincount(gid, weights=amount[order], minlength=n_groups).astype(np.int64)
    from_remote = np.empty(n, dtype=np.int64)
    from_remote[rep_pos] = inter_node[order]
    from_remote[home_pos] = remote_pool - np.bincount(gid, weights=inter_node[order], minlength=n_groups).astype(np.int64)
    start = np.r_[True, e_gid[1:] != e_gid[:-1]]
    own = np.minimum(src_g[e_gid, e_holder], e_amount - from_remote)
    need = e_amount - own
    # columns in node-block order (node n's ranks at [n*g, (n+1)*g)) so that a group's home-node sources
    # are one contiguous block: identity for Megatron's default layout (rank r on node r // g)
    col_rank = node_ranks.reshape(-1)                                     # block column -> rank
    blocked = not np.array_equal(col_rank, np.arange(G))
    pos_of_rank = np.empty(G, dtype=np.int64)
    pos_of_rank[col_rank] = np.arange(G)
    rem = src_g[:, col_rank] if blocked else src_g.copy()
    rem[e_gid, pos_of_rank[e_holder]] -= own.astype(np.int32)            # one copy per (expert, rank): no repeats
    rem_local = rem.reshape(n_groups, N, g)[groups, home_node]            # [n_groups, g] home node's sources
    rem_remote = rem.copy()
    rem_remote.reshape(n_groups, N, g)[groups, home_node] = 0             # [n_groups, G] other nodes' sources
    need_upto = _group_cumsum(need, start)
    remote_upto = _group_cumsum(from_remote, start)
    local_upto = need_upto - remote_upto
    # only the replicas' rows are materialised: the home comes last in its group and takes the rest
    r_gid, r_from_remote, r_need = e_gid[rep_pos], from_remote[rep_pos], need[rep_pos]
    r_remote_upto, r_local_upto = remote_upto[rep_pos], local_upto[rep_pos]
    take = _interval_take(rem_remote[r_gid], r_remote_upto - r_from_remote, r_remote_upto)      # [K, G]
    take_local = _interval_take(rem_local[r_gid], r_local_upto - (r_need - r_from_remote), r_local_upto)
    take.reshape(K, N, g)[np.arange(K), home_node[r_gid]] += take_local
    take[np.arange(K), pos_of_rank[holder[order]]] += own[rep_pos].astype(np.int32)
    quota = np.empty((K, G), dtype=np.int32)
    quota[order] = take[:, pos_of_rank] if blocked else take
    return quota


def plan_relibra(counts: np.ndarray, topo: Topology, expert_at_home_prev: np.ndarray | None = None,
                 mode: str = "both", replication: ReplicationConfig = ReplicationConfig(),
                 reorder: ReorderConfig = ReorderConfig()) -> BatchPlan:
    """relibra's plan for one batch.

    counts: [M, L, G, E] pairs per (micro-batch, layer, source rank, expert).
    expert_at_home_prev: [L, E] the placement in force (None: Megatron's identity).
    mode: "both" | "reorder" | "replicate".
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
    total = counts.sum(axis=2)                                           # [M, L, E], shared by both steps
    placement = plan_placement(counts, topo, prev, reorder, total) if mode in ("both", "reorder") else prev
    if mode in ("both", "replicate"):
        rep_e, rep_q = plan_replicas(counts, topo, placement, replication, total)
    else:
        rep_e = np.full((M, L, G, topo.R), -1, dtype=np.int64)
        rep_q = np.zeros((M, L, G, topo.R, G), dtype=np.int64)
    moved = (_home_rank(prev, topo.S) != _home_rank(placement, topo.S)).sum(1)
    return BatchPlan(topo, placement, rep_e, rep_q, moved)
