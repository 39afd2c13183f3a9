"""Compiled kernels of the reorder (reorder.py): one problem (a layer's experts -> nodes, or a node's
experts -> its ranks) at a time, start to finish, so that its loads stay in cache and nothing is copied per
candidate.

assign_bins does what reorder._cheapest_assignment does for all problems at once in numpy (the readable
reference, tests/planner/test_reorder_kernels.py compares them): greedy packings at every stickiness level,
labels matched to the previous assignment, the cheapest candidate, then the cheapest of its refining swap
steps. Loads are integer pair counts held as floats, so the sums and dot products the choices compare are
exact in any order (the _*_int helpers let the compiler vectorise them); the one product that is not (an
item's load . the mean bin load, the price of stickiness) keeps the reference's order.
"""
from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True)
# kernels that allocate nothing: without numba's reference counting, whose atomic updates on every array
# passed or viewed cost more than their work on small problems
_jit_no_nrt = numba.njit(nogil=True, cache=True, _nrt=False)
# for dot products of integer-valued vectors only: exact in any summation order, so reassociation is safe
_jit_int = numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})

# cost kinds of assign_bins (reorder._node_cost, reorder._rank_cost), with their parameters
NODE_COST = 0   # (g ranks per node, move cost, G EP ranks, share of the busiest NIC)
RANK_COST = 1   # (move cost inside the node, arrival cost from another node, -, -)


@_jit_no_nrt
def _dot(a, b):
    out = 0.0
    for i in range(len(a)):
        out += a[i] * b[i]
    return out


@_jit_int
def _row_dot_int(x, a, y, b):
    """x[a] . y[b], rows of integer-valued matrices."""
    out = 0.0
    for m in range(x.shape[1]):
        out += x[a, m] * y[b, m]
    return out


@_jit_int
def _row_dot_vec_int(x, a, v):
    """x[a] . v, integer-valued."""
    out = 0.0
    for m in range(len(v)):
        out += x[a, m] * v[m]
    return out


@_jit_int
def _row_dist_int(x, a, b):
    """|x[a] - x[b]|^2, integer-valued."""
    out = 0.0
    for m in range(x.shape[1]):
        d = x[a, m] - x[b, m]
        out += d * d
    return out


@_jit
def expert_loads(counts, out):
    """counts [M, L, G, E] (any integer or float dtype) -> out [L, E, M] float64: pairs per expert, summed
    over source ranks, read once."""
    M, L, G, E = counts.shape
    acc = np.empty(E)
    for m in range(M):
        for l in range(L):
            acc[:] = 0.0
            for r in range(G):
                for e in range(E):
                    acc[e] += counts[m, l, r, e]
            for e in range(E):
                out[l, e, m] = acc[e]


@_jit
def placement_cost(load, expert_at_home, node_of_rank, num_nodes, S, out):
    """out [L]: reorder._placement_cost, squared deviations from the mean of node loads plus those of rank
    loads, summed over micro-batches. load [L, E, M]; expert_at_home [L, E]."""
    L, E, M = load.shape
    G = E // S
    rank_load = np.empty((G, M))
    node_load = np.empty((num_nodes, M))
    for l in range(L):
        rank_load[:] = 0.0
        node_load[:] = 0.0
        for r in range(G):
            for s in range(S):
                e = expert_at_home[l, r * S + s]
                for m in range(M):
                    rank_load[r, m] += load[l, e, m]
            n = node_of_rank[r]
            for m in range(M):
                node_load[n, m] += rank_load[r, m]
        out[l] = _squared_deviations(node_load) + _squared_deviations(rank_load)


@_jit
def _squared_deviations(x):
    """Sum over columns of x [K, M] of the squared deviations from the column's mean."""
    K, M = x.shape
    total = 0.0
    for m in range(M):
        mean = 0.0
        for k in range(K):
            mean += x[k, m]
        mean /= K
        for k in range(K):
            total += (x[k, m] - mean) ** 2
    return total


@_jit
def assign_bins(load, num_bins, prev, levels, sticky, with_cost, cost_kind, params, counts, node_ranks, iters, out):
    """Items -> bins for P problems; reorder._cheapest_assignment, one problem at a time.

    load [P, n, M] float64; prev [P, n] each item's previous bin (-1: none); levels [K] stickiness levels;
    sticky: whether the packings keep items in their previous bin (within their level's price);
    with_cost False: the packing at levels[0], labels matched to prev, refined by `iters` swap steps.
    with_cost True: the cheapest (first on ties) of the previous assignment (where every item had a bin;
    else the first level's packing) and the packings at every level, then of the swap steps on it, under
    cost_kind with params [4] (see NODE_COST, RANK_COST). A node cost with a share of the busiest NIC > 0
    needs the layers' counts [M, P, G, E] and node_ranks [N, g] (else any arrays).
    Writes bin_of_item into out [P, n] (n / num_bins per bin).
    """
    P, n, M = load.shape
    K = len(levels)
    per = n // num_bins
    rowsum = np.empty(n)
    mean_bin = np.empty(M)
    bin_load = np.empty((num_bins, M))
    bin_items = np.empty(num_bins, dtype=np.int64)
    score = np.empty(num_bins)
    overlap = np.empty((num_bins, num_bins), dtype=np.int64)
    mapping = np.empty(num_bins, dtype=np.int64)
    row_free = np.empty(num_bins, dtype=np.bool_)
    col_free = np.empty(num_bins, dtype=np.bool_)
    row_best = np.empty(num_bins, dtype=np.int64)
    price = np.empty(n)
    # with few items per bin, the items' dot products (n^2 M, once) are cheaper than the bins' (n bins M per
    # packing): the packings then only add them up, and the swaps look them up
    use_gram = per <= max(K, 1) and per < M
    gram = np.empty((n, n) if use_gram else (1, 1))
    bin_dot = np.empty((num_bins, n) if use_gram else (1, 1))
    cand = np.empty(n, dtype=np.int64)
    packed = np.empty(n, dtype=np.int64)                                  # the last level's packing, unmatched
    step_best = np.empty(n, dtype=np.int64)
    step_score = np.empty(n)
    step_score_prev = np.empty(n)
    step_of = np.empty(n, dtype=np.int64)
    members = np.empty((num_bins, per), dtype=np.int64)
    # swap work space
    node_load = np.empty((num_bins, M))
    delta = np.empty(M)
    proj_a = np.empty(per)
    proj_b = np.empty(per)
    by_a = np.empty(per, dtype=np.int64)
    by_b = np.empty(per, dtype=np.int64)
    sq = np.empty(n)
    cost_space = np.empty((num_bins, M))
    # cost work space; the inter-node terms: pairs from each source rank to each item, each rank's pairs,
    # and the pairs of each node's ranks that stay on their node
    inter = cost_kind == NODE_COST and params[3] > 0
    G, g = (counts.shape[2], node_ranks.shape[1]) if inter else (1, 1)
    cst = (cost_kind, params, np.empty(num_bins), np.empty(num_bins), np.empty((n, G, M) if inter else (1, 1, 1)),
           np.empty((G, M) if inter else (1, 1)), node_ranks, np.empty((num_bins, g, M) if inter else (1, 1, 1)))
    for p in range(P):
        w = load[p]
        for i in range(n):
            rowsum[i] = w[i].sum()
        order = np.argsort(-rowsum, kind="mergesort")                    # heaviest first, stable
        mean_bin[:] = 0.0
        for i in range(n):
            mean_bin += w[i]
        mean_bin /= num_bins
        for i in range(n):
            price[i] = _dot(w[i], mean_bin)
        if use_gram:
            for i in range(n):
                for j in range(i + 1):
                    gram[i, j] = gram[j, i] = _row_dot_int(w, i, w, j)
        if inter:
            _source_loads(counts, p, cst[4], cst[5])
        if not with_cost:
            _pack_one(w, order, num_bins, per, prev[p], levels[0], sticky, price, use_gram, gram, bin_dot, bin_load,
                      bin_items, score, True, packed, step_best, step_score, step_score_prev)
            cand[:] = packed
            _match_one(cand, prev[p], num_bins, overlap, mapping, row_free, col_free, row_best)
            _members_of(cand, num_bins, members)
            _swap_one(w, use_gram, gram, members, iters, False, cst, prev[p], node_load, delta, proj_a, proj_b, by_a,
                      by_b, sq, step_of, 0.0, out[p])
            continue
        has_prev = True
        for i in range(n):
            if prev[p, i] < 0:
                has_prev = False
        best = np.inf
        if has_prev:
            best = _cost(w, prev[p], prev[p], cst, cost_space)
            out[p] = prev[p]
        for k in range(K):
            if not _pack_one(w, order, num_bins, per, prev[p], levels[k], sticky, price, use_gram, gram, bin_dot,
                             bin_load, bin_items, score, k == 0, packed, step_best, step_score, step_score_prev):
                continue                                                  # the last level's candidate again
            cand[:] = packed
            _match_one(cand, prev[p], num_bins, overlap, mapping, row_free, col_free, row_best)
            if k == 0 and not has_prev:                                  # stands in for the previous one
                best = _cost(w, cand, prev[p], cst, cost_space)
                out[p] = cand
                continue
            c = _cost(w, cand, prev[p], cst, cost_space)
            if c < best:
                best = c
                out[p] = cand
        _members_of(out[p], num_bins, members)
        _swap_one(w, use_gram, gram, members, iters, True, cst, prev[p], node_load, delta, proj_a, proj_b, by_a, by_b,
                  sq, step_of, best, out[p])


@_jit_no_nrt
def _source_loads(counts, l, by_source, tokens):
    """Layer l of counts [M, L, G, E] -> by_source [E, G, M] (pairs from each source rank to each expert)
    and tokens [G, M] (pairs of each source rank)."""
    M, L, G, E = counts.shape
    tokens[:] = 0.0
    for r in range(G):                                                     # M read streams, 128 B writes
        for e in range(E):
            for m in range(M):
                x = counts[m, l, r, e]
                by_source[e, r, m] = x
                tokens[r, m] += x


@_jit_no_nrt
def _pack_one(w, order, num_bins, per, prev, stickiness, sticky, price, use_gram, gram, bin_dot, bin_load, bin_items,
              score, first, packed, step_best, step_score, step_score_prev):
    """reorder._pack for one problem: items heaviest first, each into the bin (with room) whose load it
    grows the sum of squares least (its load . the bin's); it stays in its previous bin when that costs at
    most stickiness x price (its load . the mean bin load) more. w [n, M]; writes packed [n].
    use_gram: gram [n, n] holds the items' dot products, and bin_dot [num_bins, n] keeps each bin's load .
    every item (else bin_load [num_bins, M] keeps the bins' loads).

    Levels of stickiness packed one after another (first: the first level) share their steps until their
    choices differ: packed holds the last level's packing, and step_best, step_score, step_score_prev [n] each
    step's best bin, its score and the previous bin's score, so that a step they share needs no scores.
    Returns False where this level's packing is the last one's."""
    n, M = w.shape
    start = 0
    if not first:
        start = n
        for i in range(n):                                                # the steps shared with the last level
            item = order[i]
            b = step_best[i]
            pb = prev[item]
            if sticky and pb >= 0 and step_score_prev[i] <= step_score[i] + stickiness * price[item]:
                b = pb
            if b != packed[item]:
                start = i
                break
        if start == n:
            return False
    bin_dot[:] = 0.0
    bin_load[:] = 0.0
    bin_items[:] = 0
    for i in range(n):
        item = order[i]
        if i >= start:
            if use_gram:
                for k in range(num_bins):
                    score[k] = bin_dot[k, item]
            else:
                for k in range(num_bins):
                    score[k] = _row_dot_int(bin_load, k, w, item)
            b = -1
            for k in range(num_bins):
                if bin_items[k] >= per:
                    score[k] = np.inf
                elif b < 0 or score[k] < score[b]:
                    b = k
            pb = prev[item]
            step_best[i] = b
            step_score[i] = score[b]
            step_score_prev[i] = score[pb] if pb >= 0 else np.inf
            if sticky and pb >= 0 and score[pb] <= score[b] + stickiness * price[item]:
                b = pb
            packed[item] = b
        b = packed[item]
        bin_items[b] += 1
        if use_gram:
            for j in range(n):
                bin_dot[b, j] += gram[item, j]
        else:
            for m in range(M):
                bin_load[b, m] += w[item, m]
    return True


@_jit_no_nrt
def _match_one(label, old, num_labels, overlap, mapping, row_free, col_free, row_best):
    """reorder._match_labels for one problem, in place: rename label [n] so it agrees with old [n] (-1: no
    preference) on as many items as possible; greedily the largest overlap of a free label pair first, the
    first in row-major order on ties. row_best [num_labels]: each free row's first largest free column."""
    overlap[:] = 0
    for i in range(len(label)):
        if old[i] >= 0:
            overlap[label[i], old[i]] += 1
    row_free[:] = True
    col_free[:] = True
    for a in range(num_labels):
        row_best[a] = _first_largest(overlap, a, col_free)
    for _ in range(num_labels):
        ba = -1
        for a in range(num_labels):
            if row_free[a] and (ba < 0 or overlap[a, row_best[a]] > overlap[ba, row_best[ba]]):
                ba = a
        bb = row_best[ba]
        mapping[ba] = bb
        row_free[ba] = False
        col_free[bb] = False
        for a in range(num_labels):
            if row_free[a] and row_best[a] == bb:
                row_best[a] = _first_largest(overlap, a, col_free)
    for i in range(len(label)):
        label[i] = mapping[label[i]]


@_jit_no_nrt
def _first_largest(overlap, a, col_free):
    """The first free column of row a with the largest overlap (-1 when none is free)."""
    best = -1
    for b in range(overlap.shape[1]):
        if col_free[b] and (best < 0 or overlap[a, b] > overlap[a, best]):
            best = b
    return best


@_jit
def _members_of(bin_of, num_bins, members):
    """bin_of [n] -> members [num_bins, per], each bin's items ascending (a stable argsort's order)."""
    fill = np.zeros(num_bins, dtype=np.int64)
    for i in range(len(bin_of)):
        b = bin_of[i]
        members[b, fill[b]] = i
        fill[b] += 1


@_jit_no_nrt
def _cost(w, bin_of, prev, cst, bin_load):
    """The cost of one assignment bin_of [n] (see assign_bins), in pairs; bin_load [num_bins, M] is work space."""
    n, M = w.shape
    bin_load[:] = 0.0
    for i in range(n):
        b = bin_of[i]
        for m in range(M):
            bin_load[b, m] += w[i, m]
    return _cost_of_loads(bin_load, bin_of, prev, cst)


@_jit_no_nrt
def _cost_of_loads(bin_load, bin_of, prev, cst, kept_ready=False):
    """_cost, given the assignment's bin loads bin_load [num_bins, M]. cst: (cost kind, its parameters, work
    space: moved_in [num_bins], arrived_in [num_bins], by_source [n, G, M], tokens [G, M], node_ranks [N, g],
    kept [N, g, M], which kept_ready says already holds the assignment's kept pairs)."""
    cost_kind, params, moved_in, arrived_in, by_source, tokens, node_ranks, kept = cst
    num_bins, M = bin_load.shape
    busy = 0.0
    for m in range(M):
        most = bin_load[0, m]
        for b in range(1, num_bins):
            most = max(most, bin_load[b, m])
        busy += most
    if cost_kind == NODE_COST:
        g, move_cost, G, share = params[0], params[1], params[2], params[3]
        moves = 0
        for i in range(len(bin_of)):
            if bin_of[i] != prev[i]:
                moves += 1
        if share > 0:
            if not kept_ready:
                _kept_pairs(bin_of, by_source, node_ranks, kept)
            busy = ((1 - share) * busy + share * _busiest_nic(bin_load, tokens, node_ranks, kept)) / g
        else:
            busy = busy / g
        return busy + moves * move_cost / G
    move_cost, arrival_cost = params[0], params[1]
    moved_in[:] = 0.0
    arrived_in[:] = 0.0
    for i in range(len(bin_of)):
        if prev[i] < 0:
            arrived_in[bin_of[i]] += 1.0
        elif bin_of[i] != prev[i]:
            moved_in[bin_of[i]] += 1.0
    migration = 0.0
    for b in range(num_bins):
        migration = max(migration, max(moved_in[b] * move_cost, arrived_in[b] * arrival_cost))
    return busy + migration


@_jit_no_nrt
def _kept_pairs(node_of, by_source, node_ranks, kept):
    """kept [N, g, M]: the pairs of each node's source ranks whose expert is on their node, under node_of [E]."""
    g = node_ranks.shape[1]
    M = kept.shape[2]
    kept[:] = 0.0
    for e in range(len(node_of)):
        n = node_of[e]
        for j in range(g):
            r = node_ranks[n, j]
            for m in range(M):
                kept[n, j, m] += by_source[e, r, m]


@_jit_no_nrt
def _busiest_nic(node_load, tokens, node_ranks, kept):
    """Summed over micro-batches, g x the busiest InfiniBand NIC's pairs: the most any source rank sends to
    other nodes (times g), or any node receives from them (exact: integer loads). node_load [N, M], kept
    [N, g, M] (_kept_pairs) of one assignment; tokens [G, M] each source rank's pairs."""
    N, g = node_ranks.shape
    M = node_load.shape[1]
    total = 0.0
    for m in range(M):
        most = -np.inf
        for n in range(N):
            stay = 0.0
            for j in range(g):
                most = max(most, (tokens[node_ranks[n, j], m] - kept[n, j, m]) * g)
                stay += kept[n, j, m]
            most = max(most, node_load[n, m] - stay)
        total += most
    return total


@_jit_no_nrt
def _swap_kept_pairs(a, h, b, k, by_source, node_ranks, kept):
    """kept after item a moves from node h to node k and item b from k to h (exact: integer loads)."""
    g = node_ranks.shape[1]
    M = kept.shape[2]
    for j in range(g):
        rh, rk = node_ranks[h, j], node_ranks[k, j]
        for m in range(M):
            kept[h, j, m] += by_source[b, rh, m] - by_source[a, rh, m]
            kept[k, j, m] += by_source[a, rk, m] - by_source[b, rk, m]


@_jit_no_nrt
def _sort_order(x, sign, order):
    """order: the indices of x by increasing sign * x (insertion sort: x is short)."""
    for i in range(len(x)):
        v = sign * x[i]
        j = i
        while j > 0 and sign * x[order[j - 1]] > v:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i


@_jit_no_nrt
def _swap_one(w, use_gram, gram, members, iters, with_cost, cst, prev, node_load, delta, proj_a, proj_b, by_a, by_b,
              sq, step_of, best, bin_of):
    """reorder._swap for one problem: up to `iters` swaps, each between the two bins whose per-micro-batch
    loads differ most, the one that lowers the sum of squared deviations from the mean most. members
    [N, per] each bin's items (changed in place). with_cost: bin_of [n] holds the assignment the swaps
    start from, of cost `best`, and ends with the cheapest step (the earliest on ties); else it ends with the
    last step. use_gram: gram [n, n] holds the items' dot products. node_load, delta, proj_a / proj_b and
    by_a / by_b (their orders), sq, step_of: work space."""
    n, M = w.shape
    N, per = members.shape
    total = 0.0
    for e in range(n):
        sq[e] = gram[e, e] if use_gram else _row_dot_int(w, e, w, e)     # |w_e|^2
        total += sq[e]
    threshold = 1e-6 * max(total, 1.0)                                     # ignore swaps worth ~nothing
    node_load[:] = 0.0
    for b in range(N):
        for i in range(per):
            for m in range(M):
                node_load[b, m] += w[members[b, i], m]
    inter = with_cost and cst[0] == NODE_COST and cst[1][3] > 0          # the inter-node terms, kept up to date
    if inter:
        _kept_pairs(bin_of, cst[4], cst[6], cst[7])
    for step in range(iters):
        # the two bins whose loads differ most, |load_h - load_k|^2 (the first such pair in (h, k) order)
        h, k, far = 0, 0, 0.0
        for x in range(N):
            for y in range(x + 1, N):
                f = _row_dist_int(node_load, x, y)
                if f > far:
                    h, k, far = x, y, f
        for m in range(M):
            delta[m] = node_load[h, m] - node_load[k, m]
        for i in range(per):
            proj_a[i] = _row_dot_vec_int(w, members[h, i], delta)
            proj_b[i] = _row_dot_vec_int(w, members[k, i], delta)
        # gain of swapping a (on h) with b (on k): 2 (w_a - w_b).delta - 2 |w_a - w_b|^2, at most its first
        # term (the second is exact and >= 0 for integer loads). Pairs in decreasing order of the first term
        # stop where it falls below the best gain so far; the pair kept is the reference's, the first best in
        # (i, j) order
        _sort_order(proj_a, -1.0, by_a)
        _sort_order(proj_b, 1.0, by_b)
        bi, bj, gain = 0, 0, -np.inf
        for x in range(per):
            i = by_a[x]
            if 2 * (proj_a[i] - proj_b[by_b[0]]) < gain:
                break
            a = members[h, i]
            for y in range(per):
                j = by_b[y]
                first = 2 * (proj_a[i] - proj_b[j])
                if first < gain:
                    break
                b = members[k, j]
                ab = gram[a, b] if use_gram else _row_dot_int(w, a, w, b)
                g = first - 2 * (sq[a] + sq[b] - 2 * ab)
                if g > gain or (g == gain and (i < bi or (i == bi and j < bj))):
                    bi, bj, gain = i, j, g
        if not gain > threshold:
            break
        a, b = members[h, bi], members[k, bj]
        for m in range(M):
            d = w[a, m] - w[b, m]
            node_load[h, m] -= d
            node_load[k, m] += d
        members[h, bi], members[k, bj] = b, a
        if inter:
            _swap_kept_pairs(a, h, b, k, cst[4], cst[6], cst[7])
        if with_cost:
            for x in range(N):
                for i in range(per):
                    step_of[members[x, i]] = x
            # node_load: the step's bin loads, exact (integer loads)
            c = _cost_of_loads(node_load, step_of, prev, cst, inter)
            if c < best:
                best = c
                for i in range(len(bin_of)):                      # (a slice copy would need the NRT)
                    bin_of[i] = step_of[i]
    if not with_cost:
        for x in range(N):
            for i in range(per):
                bin_of[members[x, i]] = x
