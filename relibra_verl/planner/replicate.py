"""Replication: per (micro-batch, layer, node), replicas of home experts on other ranks of the node, and the
quotas that split each expert's pairs over its copies.

Each (micro-batch, layer, node) is one problem; its g ranks' state is, in routed pairs,
  T_r  GEMM work: pairs computed + replica_overhead_pairs per GEMM call (a copy that computes pairs),
  X_r  pairs received from other nodes (InfiniBand: the busiest NIC sets the all-to-all's time),
and the objective is the problem's critical path
  J = (1 - s) * max T + s * max(max X, F),
s = inter_node_share, F = the most any rank of the layer sends to other nodes (replication inside a node
cannot lower it). Greedy: each step makes the move of one home expert's pairs from its home rank to a
replica on another rank of the node that lowers J most (of moves that lower it about as much, the
largest: replica slots are few; a move that leaves J unchanged can still resolve a tie at the maximum for
the next one), or, where it lowers J more, an exchange: two ranks' home experts trade places for the
micro-batch, each as a replica with all of the other's remaining pairs, which adds no GEMM call. A move
takes the pairs of each kind (from other nodes, from the home node) that bring the two ranks towards the
node's means (_best_move). Two runs per problem, moves only and (with a GEMM-call cost) moves and
exchanges, the one that ends lower kept; its steps up to the lowest J are kept, so no problem ends above
its unreplicated J; and a node that does not set its layer's time keeps only the steps that bring it under
the layer's busiest rank and NIC (_shortest_equal_prefix): its other replicas would cost copies and GEMM
calls for nothing.

Only the nodes that set the layer's time can change it, so the work goes there (_plan_layers): every node
gets the moves-only run, nodes with the highest bounds first, and a run ends once its node is under the
busiest rank and NIC of the nodes before it (or under the layer's bounds); then the nodes with the layer's
highest J, busiest rank and busiest NIC get their run in full if it was cut short, and their exchange run
(which takes the moves-only run's recorded best moves until its first exchange), until the nodes on top have
had both. plan_replicas(..., _thorough=True) gives every node both runs in full: the reference
(tests/planner/test_replica_lazy.py).

Quotas (_write_quotas): every copy takes its inter-node pairs from the other nodes' sources in rank order
(which source does not change any NIC's load), and its intra-node pairs from its own rank first (they
never leave the GPU), then from the home node's sources in rank order; the home keeps the rest.

The greedy is compiled (numba, nogil: a planning thread does not hold the GIL; cached on disk) and runs one
problem at a time: a problem is a few dozen candidates per step, too small for array code to pay its
per-call overhead, which was most of the numpy version's time.
"""
from __future__ import annotations

import dataclasses

import numba
import numpy as np

from relibra_verl.planner.types import Topology

_jit = numba.njit(nogil=True, cache=True)
# kernels that allocate nothing: without numba's reference counting (NRT), whose atomic count updates on every
# array passed, unpacked or viewed took about a tenth of the planner's time
_jit_no_nrt = numba.njit(nogil=True, cache=True, _nrt=False)
# small helpers of the greedy step, inlined into their callers (a call passing arrays costs reference counts)
_inline = numba.njit(nogil=True, cache=True, inline="always")


@dataclasses.dataclass(frozen=True)
class ReplicationConfig:
    """Knobs of the replication planner.

    min_replica_tokens: a replica must carry at least this many pairs (time-aware planning sets it to
        the tokens that repay the replica's weight copy; see relibra_verl.planner.configs).
    max_copies_per_owner: cap on replicas one owner rank sends per micro-batch and layer (None: R*(g-1)).
    tolerance: a problem stops once its objective is within this fraction of its lower bound (every
        rank at its node's mean).
    replica_overhead_pairs: what one more expert GEMM call costs its rank, in routed pairs of GEMM work
        (relibra_verl.planner.configs.replica_overhead_tokens); a home expert left without pairs frees its call.
    inter_node_share: the weight of the busiest InfiniBand NIC against the busiest rank's GEMM work in the
        objective: the share of a cross-node pair's cost that is its transfer
        (relibra_verl.planner.configs.inter_node_share, 0.78-0.90 for the presets on h100-ib400). No effect
        with one node.
    copy_cost_pairs: what a replica copy costs the rank that sends or receives most copies (the exposed
        part of its weight copies and gradient reduce), in routed pairs of GEMM work
        (relibra_verl.planner.configs.copy_cost_pairs). Charged to exchanges, which add no GEMM call, where
        they raise the node's busiest copier; a move's GEMM call is its cost. Exchanges are planned only
        with replica_overhead_pairs > 0 (without a call cost a move does as well).
    """

    min_replica_tokens: int = 1
    max_copies_per_owner: int | None = None
    tolerance: float = 0.002
    replica_overhead_pairs: float = 0.0
    inter_node_share: float = 0.8
    copy_cost_pairs: float = 0.0


def plan_replicas(counts: np.ndarray, topo: Topology, expert_at_home: np.ndarray,
                  config: ReplicationConfig = ReplicationConfig(),
                  layers: np.ndarray | None = None, quotas: bool = True,
                  _thorough: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicas and quotas for every (micro-batch, layer), inside each node.

    counts: [M, L', G, E] integer pairs; layers: [L] the layers of counts to plan (None: all, L = L');
    expert_at_home: [L, E] their placement. Returns replica_expert [M, L, G, R] (-1 empty), replica_quota
    [M, L, G, R, G_src] and critical_path [M, L]: the planner's J of the layer's slowest node after
    replication, with its busiest copier's copies at copy_cost_pairs each in GEMM work (what plan_relibra
    weighs against a placement's migration). quotas False: critical_path only (the same), the replicas are
    not written (replica_expert all -1, replica_quota zeros): a placement weighed by its J needs no more.
    _thorough: every node gets both runs in full, no run stops early (the reference the tests hold the
    planner to).
    """
    M, _, G, E = counts.shape
    layers = np.arange(counts.shape[1]) if layers is None else np.asarray(layers, dtype=np.int64)
    L = len(layers)
    S, R, N, g = topo.S, topo.R, topo.num_nodes, topo.ranks_per_node
    replica_expert = np.full((M, L, G, R), -1, dtype=np.int64)
    replica_quota = np.zeros((M, L, G, R, G), dtype=np.int32)
    critical_path = np.zeros((M, L), dtype=np.float64)
    counts = np.ascontiguousarray(counts)
    if counts.dtype.kind not in "iu":
        counts = counts.astype(np.int64)
    cap = R * (g - 1) if config.max_copies_per_owner is None else int(config.max_copies_per_owner)
    share = float(config.inter_node_share) if N > 1 else 0.0
    replicate = R > 0 and g > 1
    _plan_layers(counts, layers, np.ascontiguousarray(expert_at_home, dtype=np.int64), topo.node_ranks(),
                 np.asarray(topo.node_of_rank, dtype=np.int64), S, R if replicate else 0, cap,
                 max(1, int(config.min_replica_tokens)), float(config.replica_overhead_pairs), share,
                 float(config.tolerance), float(config.copy_cost_pairs), share > 0 or N > 1,
                 replica_expert, replica_quota, critical_path, bool(quotas), _thorough)
    return replica_expert, replica_quota, critical_path


def replica_lower_bound(counts: np.ndarray, topo: Topology, expert_at_home: np.ndarray,
                        config: ReplicationConfig = ReplicationConfig(), layers: np.ndarray | None = None) -> np.ndarray:
    """[M, L] a lower bound of plan_replicas' critical_path, without planning: per layer its slowest node's J
    with every rank at the node's mean (replicas only add GEMM calls and copies). Arguments as plan_replicas."""
    M, _, G, E = counts.shape
    layers = np.arange(counts.shape[1]) if layers is None else np.asarray(layers, dtype=np.int64)
    out = np.zeros((M, len(layers)))
    counts = np.ascontiguousarray(counts)
    if counts.dtype.kind not in "iu":
        counts = counts.astype(np.int64)
    share = float(config.inter_node_share) if topo.num_nodes > 1 else 0.0
    _lower_bounds(counts, layers, np.ascontiguousarray(expert_at_home, dtype=np.int64), topo.node_ranks(),
                  np.asarray(topo.node_of_rank, dtype=np.int64), topo.S, float(config.replica_overhead_pairs), share,
                  out)
    return out


@_jit
def _lower_bounds(counts, layers, expert_at_home, node_ranks, node_of_rank, S, overhead, share, out):
    M, _, G, E = counts.shape
    N, g = node_ranks.shape
    node_sum = np.zeros((N, E), dtype=np.int64)
    on_node = np.zeros((N, E), dtype=np.int64)
    home_r = np.zeros((N, g, S), dtype=np.int64)
    home_l = np.zeros((N, g, S), dtype=np.int64)
    for l in range(len(layers)):
        _home_nodes(expert_at_home[l], S, node_of_rank, on_node)
        for m in range(M):
            floor = _slot_loads(counts[m, layers[l]], expert_at_home[l], on_node, node_ranks, node_of_rank, S,
                                node_sum, home_r, home_l)
            floor = floor if N > 1 else 0.0
            bound = 0.0
            for n in range(N):
                T = 0.0
                X = 0.0
                for i in range(g):
                    for sl in range(S):
                        left = home_r[n, i, sl] + home_l[n, i, sl]
                        T += left + (overhead if left > 0 else 0.0)
                        X += home_r[n, i, sl]
                bound = max(bound, (1 - share) * T / g + share * max(X / g, floor))
            out[m, l] = bound


@_jit
def _plan_layers(counts, layers, expert_at_home, node_ranks, node_of_rank, S, R, cap, min_tokens, overhead, share, tol,
                 copy_cost, multi, replica_expert, replica_quota, critical_path, write, thorough):
    """Every (micro-batch, layer): its nodes' problems, their greedy runs, the layer's shortest prefixes,
    then (write) the kept replicas and their quotas written into replica_expert / replica_quota (see plan_replicas).
    counts [M, :, G, E] is read at layers [L]; critical_path [M, L] receives each layer's J (max over its
    nodes) after replication."""
    M, _, G, E = counts.shape
    L = len(layers)
    N, g = node_ranks.shape
    steps = g * R
    node_sum = np.zeros((N, E), dtype=np.int64)
    on_node = np.zeros((N, E), dtype=np.int64)
    home_r = np.zeros((N, g, S), dtype=np.int64)
    home_l = np.zeros((N, g, S), dtype=np.int64)
    picks = np.zeros((2, N, max(steps, 1), 6), dtype=np.int64)      # per run and node: d, sl, rv, k, a, y
    n_picks = np.zeros((2, N), dtype=np.int64)
    peak_T = np.zeros((2, N, steps + 1))
    peak_R = np.zeros((2, N, steps + 1))
    best_j = np.zeros((2, N))
    best_steps = np.zeros((2, N), dtype=np.int64)
    step_of = np.zeros((2, N, max(steps, 1)), dtype=np.int64)
    move_score = np.zeros((2, N, steps + 1))                         # each step's best move's score
    searched = np.zeros(N, dtype=np.int64)                           # steps the moves-only run searched
    settled = np.zeros((5, N))                                       # flag, J, busiest T, busiest X, bound
    settled_j, settled_T, settled_R = settled[1], settled[2], settled[3]
    work = _greedy_work(g, S)
    chosen = np.zeros(N, dtype=np.int64)
    both = np.zeros(N, dtype=np.bool_)                               # the node has had both runs
    cut = np.zeros(N, dtype=np.bool_)                                # its moves run stopped under others' peaks
    node_order = np.zeros(N, dtype=np.int64)
    keep = np.zeros(N, dtype=np.int64)
    rem = np.zeros(G, dtype=np.int64)                                # _write_quotas' scratch
    sends = np.zeros(g, dtype=np.int64)                              # _busiest_copier's
    receives = np.zeros(g, dtype=np.int64)
    # per node n, the sources in the order quotas use them up: its own ranks, then the other nodes' ranks
    # in node-block order
    sources = np.zeros((N, G), dtype=np.int64)
    for n in range(N):
        at = 0
        for m in [n] + [k for k in range(N) if k != n]:
            for i in range(g):
                sources[n, at] = node_ranks[m, i]
                at += 1
    order = np.zeros(max(steps, 1), dtype=np.int64)                  # _write_replicas' scratch
    for l in range(L):
        _home_nodes(expert_at_home[l], S, node_of_rank, on_node)
        for m in range(M):
            floor = _slot_loads(counts[m, layers[l]], expert_at_home[l], on_node, node_ranks, node_of_rank, S,
                                node_sum, home_r, home_l)
            floor = floor if N > 1 else 0.0
            runs = 2 if overhead > 0 and steps > 0 else 1
            skip, T_lb, R_lb = _settled_nodes(home_r, home_l, floor, share, overhead, settled)
            if N == 1 or thorough:
                skip, T_lb, R_lb = False, -np.inf, -np.inf
            # moves only, nodes by their bounds, highest first: the node likeliest to set the layer's time
            # runs first, and a later node stops once under the busiest rank and NIC of those before it
            # (steps _shortest_equal_prefix would cut)
            _order_by_bound(settled[4], node_order)
            stop_T, stop_X = T_lb, R_lb
            for n in node_order:
                chosen[n], both[n], cut[n] = 0, runs == 1, False
                if skip and settled[0, n] > 0:
                    best_j[0, n], best_steps[0, n], n_picks[0, n] = settled_j[n], 0, 0
                    peak_T[0, n], peak_R[0, n] = settled_T[n], settled_R[n]
                    both[n] = True
                    continue
                best_j[0, n], best_steps[0, n], n_picks[0, n], stopped, searched[n] = _greedy(
                    home_r[n], home_l[n], floor, share, overhead, min_tokens, cap, R, tol, copy_cost, multi, False,
                    picks[0, n], step_of[0, n], peak_T[0, n], peak_R[0, n], work, stop_T, stop_X, move_score[0, n],
                    picks[1, n], move_score[1, n], 0)
                cut[n] = stopped and (stop_T > T_lb or stop_X > R_lb)
                if not thorough:
                    stop_T = max(stop_T, peak_T[0, n, best_steps[0, n]])
                    stop_X = max(stop_X, peak_R[0, n, best_steps[0, n]])
            # then the nodes that set the layer's time, its highest J, busiest rank and busiest NIC, get what
            # they may lack, until they have it all: a run not cut short by other nodes' peaks (an exchange
            # run may have lowered them since), and the exchange run. Every other node is at or below them.
            while True:
                top = _pending_node(best_j, peak_T, peak_R, best_steps, chosen, cut, both, thorough)
                if top < 0:
                    break
                if cut[top]:
                    # its steps so far are taken as recorded, not searched again: the stop rule ends a run, it
                    # does not change its steps (the run reads its own records before rewriting them as equal)
                    best_j[0, top], best_steps[0, top], n_picks[0, top], _, searched[top] = _greedy(
                        home_r[top], home_l[top], floor, share, overhead, min_tokens, cap, R, tol, copy_cost, multi,
                        False, picks[0, top], step_of[0, top], peak_T[0, top], peak_R[0, top], work, T_lb, R_lb,
                        move_score[0, top], picks[0, top], move_score[0, top], searched[top])
                    cut[top] = False                 # its exchange run, if it needs one, comes after this
                    continue
                # the moves-only run's steps up to the first exchange are not searched again (_greedy)
                best_j[1, top], best_steps[1, top], n_picks[1, top], _, _ = _greedy(
                    home_r[top], home_l[top], floor, share, overhead, min_tokens, cap, R, tol, copy_cost, multi,
                    True, picks[1, top], step_of[1, top], peak_T[1, top], peak_R[1, top], work, T_lb, R_lb,
                    move_score[1, top], picks[0, top], move_score[0, top], searched[top])
                both[top] = True
                chosen[top] = 1 if best_j[1, top] < best_j[0, top] else 0    # ties: moves only
            for n in range(N):
                keep[n] = best_steps[chosen[n], n]
            if N > 1:
                _shortest_equal_prefix(peak_T, peak_R, chosen, keep, floor)
            layer_j = 0.0
            for n in range(N):
                run = chosen[n]
                copies = _busiest_copier(picks[run, n], step_of[run, n], n_picks[run, n], keep[n], sends, receives)
                layer_j = max(layer_j, (1 - share) * (peak_T[run, n, keep[n]] + copy_cost * copies)
                              + share * max(peak_R[run, n, keep[n]], floor))
                if write:
                    _write_replicas(counts[m, layers[l]], node_sum, expert_at_home[l], node_ranks, n, S,
                                    picks[run, n], step_of[run, n], n_picks[run, n], keep[n],
                                    replica_expert[m, l], replica_quota[m, l], sources[n], order, rem)
            critical_path[m, l] = layer_j


@_jit_no_nrt
def _settled_nodes(home_r, home_l, floor, s, overhead, settled):
    """The nodes of one (micro-batch, layer) whose greedy runs cannot change the plan, found before running
    them: settled[0, n] = 1 where node n's busiest rank and NIC already sit below what the layer's time will
    be anyway (the busiest node mean's GEMM work T_lb and NIC R_lb: a node's pairs only move between its
    ranks and each replica's call adds work, so every node ends at or above its means) and so does
    whatever step its greedy could end on (a step it keeps has J at most its J at the start, J0, which
    bounds the step's busiest T by (J0 - s F) / (1 - s) and its busiest X by (J0 - (1 - s) mean T) / s).
    Such a node keeps no replica (_shortest_equal_prefix) and leaves the layer's maxima as they are;
    settled[1:5, n] = its J0, busiest T, busiest X and bound (J with every rank at the node's means).
    Returns (whether any node is settled (only with 0 < s < 1: several nodes), T_lb, R_lb)."""
    N, g, S = home_r.shape
    settled[0] = 0.0
    T_lb, R_lb = -np.inf, floor
    for n in range(N):
        t_sum, x_sum, t_max, x_max = 0.0, 0.0, -np.inf, -np.inf
        for i in range(g):
            t, x = 0.0, 0.0
            for sl in range(S):
                left = home_r[n, i, sl] + home_l[n, i, sl]
                t += left + (overhead if left > 0 else 0.0)
                x += home_r[n, i, sl]
            t_sum += t
            x_sum += x
            t_max, x_max = max(t_max, t), max(x_max, x)
        settled[1, n] = (1 - s) * t_max + s * max(x_max, floor)
        settled[2, n], settled[3, n] = t_max, x_max
        T_lb, R_lb = max(T_lb, t_sum / g), max(R_lb, x_sum / g)
        settled[0, n] = t_sum / g                                     # the node's mean T, for below
        settled[4, n] = (1 - s) * t_sum / g + s * max(x_sum / g, floor)
    if not 0.0 < s < 1.0:
        settled[0] = 0.0
        return False, T_lb, R_lb
    margin = 1.0 - 1e-9                                               # rounding of J: strictly below
    any_settled = False
    for n in range(N):
        j0, t_max, x_max, t_mean = settled[1, n], settled[2, n], settled[3, n], settled[0, n]
        ok = (t_max <= T_lb * margin and x_max <= R_lb * margin
              and (j0 - s * floor) / (1 - s) <= T_lb * margin and (j0 - (1 - s) * t_mean) / s <= R_lb * margin)
        settled[0, n] = 1.0 if ok else 0.0
        any_settled |= ok
    return any_settled, T_lb, R_lb


@_jit_no_nrt
def _pending_node(best_j, peak_T, peak_R, best_steps, chosen, cut, both, thorough):
    """The next node of a (micro-batch, layer) to run again, or -1: of the nodes with the highest J, the
    busiest rank and the busiest NIC (at their chosen runs' lowest J; the first of equals), the first whose
    moves run was cut short or that lacks its exchange run; with thorough, any node lacking its exchange
    run. best_j [2, N], peak_T / peak_R [2, N, steps + 1], best_steps / chosen / cut / both [N]."""
    N = len(chosen)
    top_j, top_t, top_x = 0, 0, 0
    for n in range(1, N):
        if best_j[chosen[n], n] > best_j[chosen[top_j], top_j]:
            top_j = n
        if peak_T[chosen[n], n, best_steps[chosen[n], n]] > peak_T[chosen[top_t], top_t, best_steps[chosen[top_t], top_t]]:
            top_t = n
        if peak_R[chosen[n], n, best_steps[chosen[n], n]] > peak_R[chosen[top_x], top_x, best_steps[chosen[top_x], top_x]]:
            top_x = n
    for n in (top_j, top_t, top_x):
        if cut[n] or not both[n]:
            return n
    if thorough:
        for n in range(N):
            if not both[n]:
                return n
    return -1


@_jit_no_nrt
def _order_by_bound(bound, order):
    """order [N] <- the nodes by bound [N], highest first (ties: lower index first)."""
    for i in range(len(bound)):
        at = i
        while at > 0 and bound[order[at - 1]] < bound[i]:
            order[at] = order[at - 1]
            at -= 1
        order[at] = i


@_jit_no_nrt
def _busiest_copier(picks, step_of, n_picks, keep, sends, receives):
    """The most replica copies any rank of a node sends or receives in the kept steps (step < keep).
    sends, receives: [g] scratch."""
    sends[:] = 0
    receives[:] = 0
    for i in range(n_picks):
        if step_of[i] < keep:
            sends[picks[i, 0]] += 1
            receives[picks[i, 2]] += 1
    return float(max(_vmax(sends), _vmax(receives)))


@_jit_no_nrt
def _home_nodes(expert_at_home, S, node_of_rank, on_node):
    """One layer's placement expert_at_home [E] -> on_node [N, E]: 1 where the expert's home is on the node."""
    on_node[:] = 0
    for slot in range(len(expert_at_home)):
        on_node[node_of_rank[slot // S], expert_at_home[slot]] = 1


@_jit_no_nrt
def _slot_loads(counts, expert_at_home, on_node, node_ranks, node_of_rank, S, node_sum, home_r, home_l):
    """One (micro-batch, layer): counts [G, E] -> pairs left at each home slot of every node, from other
    nodes home_r [N, g, S] and from the home node home_l [N, g, S]. on_node: [N, E] of the layer
    (_home_nodes); node_sum: [N, E] scratch, the pairs each node's sources send each expert. Returns F, the
    most any rank sends to experts homed on other nodes. The loop over the loads is branch-free (it
    vectorises): every source's row is summed into its node's, and its sends off the node are its total
    less its pairs for experts on its node."""
    G, E = counts.shape
    N, g = node_ranks.shape
    node_sum[:] = 0
    floor = 0
    for src in range(G):
        node = node_of_rank[src]
        row = counts[src]
        acc = node_sum[node]
        mask = on_node[node]
        total = 0
        kept = 0
        for e in range(E):
            c = row[e]
            acc[e] += c
            total += c
            kept += c * mask[e]
        floor = max(floor, total - kept)
    for n in range(N):
        for i in range(g):
            rank = node_ranks[n, i]
            for sl in range(S):
                e = expert_at_home[rank * S + sl]
                total = 0
                for k in range(N):
                    total += node_sum[k, e]
                home_r[n, i, sl] = total - node_sum[n, e]
                home_l[n, i, sl] = node_sum[n, e]
    return float(floor)


@_inline
def _mean(v):
    """v.mean() as numba computes it (a sum in index order, over the length), without its nditer, which
    costs more than the sum on a node's few ranks."""
    total = 0.0
    for i in range(len(v)):
        total += v[i]
    return total / len(v)


@_inline
def _vmax(v):
    """v.max() (v not empty, no NaN), without numba's nditer."""
    best = v[0]
    for i in range(1, len(v)):
        if v[i] > best:
            best = v[i]
    return best


@_inline
def _objective(T, X, floor, s):
    return (1 - s) * _vmax(T) + s * max(_vmax(X), floor)


@_inline
def _top3(v):
    """Indices of the three largest entries of v (-1 where v has fewer), first occurrences first."""
    a = b = c = -1
    for i in range(len(v)):
        if a < 0 or v[i] > v[a]:
            a, b, c = i, a, b
        elif b < 0 or v[i] > v[b]:
            b, c = i, b
        elif c < 0 or v[i] > v[c]:
            c = i
    return a, b, c


@_inline
def _max_excluding_each(v, top, d, out, row):
    """out[row, r] = the largest v over ranks other than d and r (-inf if none), for every rank r; top:
    _top3(v). No branch over r."""
    a, b, c = top
    va = v[a]
    vb = v[b] if b >= 0 else -np.inf
    vc = v[c] if c >= 0 else -np.inf
    a_ok, b_ok, c_ok = a != d, b >= 0 and b != d, c >= 0 and c != d
    for r in range(len(v)):
        third = vc if (c_ok and c != r) else -np.inf
        second = vb if (b_ok and b != r) else third
        out[row, r] = va if (a_ok and a != r) else second


@_inline
def _first_max(v, row):
    """(the largest of v[row], the first index holding it); no NaN. The maximum is found without a branch,
    so the index search runs once: what a loop of `if v[row, r] > best` would find."""
    top = v[row, 0]
    for i in range(1, v.shape[1]):
        top = max(top, v[row, i])
    i = 0
    while v[row, i] != top:
        i += 1
    return top, i


@_inline
def _towards_mean(have_d, have_r, mean, overhead, min_tokens, last):
    """Pairs a donor with `have_d` gives a receiver with `have_r` to bring them towards the mean: the
    receiver's deficit (less its new GEMM call), as far as the donor is above the mean (a receiver's last
    free slot takes all of its deficit); a receiver too close to the mean takes up to where it meets the
    donor, the donor staying above the mean."""
    excess = max(have_d - mean, 0.0)
    deficit = mean - have_r - overhead
    fills = deficit if last else min(deficit, excess)
    meets = min((have_d - have_r - overhead) / 2, excess)
    return fills if deficit >= min_tokens else meets                 # both computed: no branch over ranks


@_jit
def _greedy_work(g, S):
    """The state of one greedy run, allocated once for all of them: pairs left at the home slots from
    other nodes and from the home node [g, S], T and X [g], blocked [g * S, g], replica slots used and
    replicas sent [g], and the step kernels' work space: copies [g] and scratch [15 + 2 S, g]."""
    return (np.zeros((g, S), dtype=np.int64), np.zeros((g, S), dtype=np.int64), np.zeros(g), np.zeros(g),
            np.zeros((g * S, g), dtype=np.bool_), np.zeros(g, dtype=np.int64), np.zeros(g, dtype=np.int64),
            np.zeros(g), np.zeros((15 + 2 * S, g)))


@_jit_no_nrt
def _greedy(home_r0, home_l0, floor, s, overhead, min_tokens, cap, R, tol, copy_cost, multi, exchanges,
            picks, step_of, peak_T, peak_R, work, stop_T, stop_X, move_score, track_picks, track_score, track_len):
    """One problem's greedy run (module docstring). home_r0, home_l0: [g, S] pairs at each home slot from
    other nodes / from the home node. Fills picks [:n, 6] (donor, slot, receiver, replica slot k, amount,
    inter-node part) with step_of [:n] the step of each, peak_T / peak_R [g*R + 1] the busiest rank's T
    and X after each step (constant after the last). work: _greedy_work(g, S), its state. A run whose
    busiest rank and NIC get to or under stop_T and stop_X (the layer's bounds, _settled_nodes, or the peaks
    of the nodes planned before it) ends there: _shortest_equal_prefix would cut its later steps.
    move_score [g*R + 1] receives each step's best move's score. An exchange run follows a moves-only run
    of the same problem (its picks track_picks, one per step, and move_score track_score over track_len
    searches): until its first exchange it is in the same state, so it takes that run's best move instead
    of searching again; a moves-only run cut short and run again tracks its own records the same way.
    Returns (lowest J, steps up to it, n, whether it ended under stop_T and stop_X, steps searched)."""
    g, S = home_r0.shape
    home_r, home_l, T, X, blocked, used, sent, copies, scratch = work
    for r in range(g):
        T[r], X[r] = 0.0, 0.0
        used[r], sent[r] = 0, 0              # replica slots taken, replicas each owner sends
        for sl in range(S):
            home_r[r, sl], home_l[r, sl] = home_r0[r, sl], home_l0[r, sl]
            left = home_r[r, sl] + home_l[r, sl]
            T[r] += left + (overhead if left > 0 else 0.0)
            X[r] += home_r[r, sl]
    # blocked[j, r]: rank r cannot take node-local expert j (it is j's home, holds a copy, or is full)
    for j in range(g * S):
        for r in range(g):
            blocked[j, r] = r == j // S
    best_j = _objective(T, X, floor, s)
    done_j = ((1 - s) * _mean(T) + s * max(_mean(X), floor)) * (1 + tol)   # close enough to the bound
    best_steps = 0
    n = 0
    peak_T[0], peak_R[0] = _vmax(T), _vmax(X)
    steps = g * R
    live = best_j > done_j and not (peak_T[0] <= stop_T and peak_R[0] <= stop_X)
    done = 0
    stopped = not live and peak_T[0] <= stop_T and peak_R[0] <= stop_X
    searched = 0
    for step in range(steps):
        if not live:
            break
        n_before = n
        known = step < track_len and n == step                        # no exchange yet: one pick per step
        at = step if known else 0                                     # (indexed in place: a row view costs
        n, move_score[step] = _search_step(                            # reference counts every step)
            T, X, home_r, home_l, blocked, used, sent, floor, s, overhead, min_tokens, cap, R, copy_cost, multi,
            exchanges, picks, step_of, n, step, copies, scratch, known,
            (float(track_picks[at, 0]), float(track_picks[at, 1]), float(track_picks[at, 2]),
             float(track_picks[at, 4]), float(track_picks[at, 5]), track_score[at]))
        searched = step + 1
        if n == n_before:
            break
        j = _objective(T, X, floor, s)
        if j < best_j - 1e-9:
            best_j = j
            best_steps = step + 1
        live = j > done_j
        done = step + 1
        peak_T[done], peak_R[done] = _vmax(T), _vmax(X)
        if peak_T[done] <= stop_T and peak_R[done] <= stop_X:
            best_j, best_steps, stopped = j, done, True
            break
    for k in range(done + 1, steps + 1):
        peak_T[k], peak_R[k] = peak_T[done], peak_R[done]
    return best_j, best_steps, n, stopped, searched


@_inline
def _search_step(T, X, home_r, home_l, blocked, used, sent, floor, s, overhead, min_tokens, cap, R, copy_cost,
                 multi, exchanges, picks, step_of, n, step, copies, scratch, known, known_move):
    """One greedy step: the best move, or where it lowers J more the best exchange, applied (picks[n:]).
    With `known`, known_move is the best move (as _best_move returns it), found by a run in this state.
    Returns (the new n, unchanged when nothing lowers J; the best move's score)."""
    S = home_r.shape[1]
    j_now = _objective(T, X, floor, s)
    topT, topX = _top3(T), _top3(X)
    # only a move off a busiest rank lowers J: the rank with the most GEMM work or the most inter-node pairs
    dT, dX = topT[0], topX[0]
    if known:
        mv = known_move
    else:
        mv = _best_move(T, X, topT, topX, home_r, home_l, blocked, used, sent, dT, dX if multi else -1, floor, s,
                        overhead, min_tokens, cap, R, j_now, scratch)
    if exchanges:
        # one donor for exchanges: the busiest rank of the term (GEMM work or NIC) whose excess weighs more
        d = dT
        if multi:
            e_t = (1 - s) * (_vmax(T) - _mean(T))
            e_r = s * (max(_vmax(X), floor) - max(_mean(X), floor))
            d = dT if e_t >= e_r else dX
        # an exchange is taken where it scores above the best move and above rounding
        at_least = max(mv[5], 1e-6 * j_now)
        ex = _best_exchange(T, X, topT, topX, home_r, home_l, blocked, used, sent, copies, d, floor, s,
                            min_tokens, cap, R, copy_cost, j_now, at_least, scratch)
        if ex[8] > at_least:
            d, a, r, b, ua, ya, ub, yb = int(ex[0]), int(ex[1]), int(ex[2]), int(ex[3]), ex[4], ex[5], ex[6], ex[7]
            n = _apply_pick(picks, step_of, n, step, d, a, r, int(ua), int(ya), T, X, home_r, home_l, blocked, used,
                            sent, overhead, R, S)
            n = _apply_pick(picks, step_of, n, step, r, b, d, int(ub), int(yb), T, X, home_r, home_l, blocked, used,
                            sent, overhead, R, S)
            return n, mv[5]
    if mv[5] > 1e-6 * j_now:
        n = _apply_pick(picks, step_of, n, step, int(mv[0]), int(mv[1]), int(mv[2]), int(mv[3]), int(mv[4]),
                        T, X, home_r, home_l, blocked, used, sent, overhead, R, S)
    return n, mv[5]


@_inline
def _apply_pick(picks, step_of, n, step, d, sl, rv, a, y, T, X, home_r, home_l, blocked, used, sent, overhead, R, S):
    """A replica of donor d's home slot sl on rank rv taking a pairs, y of them from other nodes."""
    picks[n, 0], picks[n, 1], picks[n, 2], picks[n, 3], picks[n, 4], picks[n, 5] = d, sl, rv, used[rv], a, y
    step_of[n] = step
    home_r[d, sl] -= y
    home_l[d, sl] -= a - y
    emptied = home_r[d, sl] + home_l[d, sl] == 0                     # the home copy's GEMM call goes
    T[d] -= a + (overhead if emptied else 0.0)
    T[rv] += a + overhead
    X[d] -= y
    X[rv] += y
    sent[d] += 1
    used[rv] += 1
    blocked[d * S + sl, rv] = True
    if used[rv] == R:
        blocked[:, rv] = True
    return n + 1


@_inline
def _best_move(T, X, topT, topX, home_r, home_l, blocked, used, sent, d1, d2, floor, s, overhead, min_tokens,
               cap, R, j_now, scratch):
    """The best move off donor d1 or d2 (-1: none): every (home slot of the donor, receiver r) of the node,
    with the amounts that bring donor and receiver towards the node's means, scored by how much it lowers
    J and, secondarily, by its size (_move_score); of equal scores the first in (donor, slot, receiver)
    order. scratch: [8, g] (or more rows). Returns (donor, slot, receiver, amount, inter-node part, score; score -inf when
    no move is allowed).

    Amounts, towards the node's means. Rule "per kind": pairs from other nodes fill the receiver's X up to
    the mean, as far as the donor is above it; the rest (T less X) likewise, less the receiver's new GEMM
    call. Rule "GEMM work": the amount fills the receiver's T, of any kind (as many from other nodes as the
    first rule takes, within it): where no NIC is near the critical path, the kinds need no balance of
    their own. In either, a receiver too close to the mean may still take work above it, up to where it
    meets the donor; a receiver's last free slot takes as much as fills it (the donor has free slots of its
    own to be refilled, the receiver would have none). A receiver is never pushed far above the mean: it
    cannot shed a replica. The better-scoring rule is taken.

    Every candidate is scored: the loop over receivers has no branch (it vectorises over a node's ranks),
    and the best is picked after it (tests/planner/test_replica_kernels.py holds the plain version)."""
    g, S = home_r.shape
    x_mean, t_mean = _mean(X), _mean(T)
    tx_mean = t_mean - x_mean
    best = (-1.0, -1.0, -1.0, 0.0, 0.0, -np.inf)
    # scratch rows, per receiver: 0 T_other, 1 X_other (the other ranks' peaks), 2-4 the unclipped amounts
    # (inter-node part per kind, rest per kind, GEMM work), 5-7 the slot's score, amount, inter-node part
    w = scratch
    for i in range(2):
        d = d1 if i == 0 else d2
        if d < 0 or sent[d] >= cap or (i == 1 and d == d1):
            continue
        Td, Xd = T[d], X[d]
        _max_excluding_each(T, topT, d, w, 0)
        _max_excluding_each(X, topX, d, w, 1)
        for r in range(g):
            last = R - used[r] == 1
            w[1, r] = max(w[1, r], floor)
            w[2, r] = max(min(x_mean - X[r], Xd - x_mean), 0.0)
            w[3, r] = max(_towards_mean(Td - Xd, T[r] - X[r], tx_mean, overhead, min_tokens, last), 0.0)
            w[4, r] = max(_towards_mean(Td, T[r], t_mean, overhead, min_tokens, last), 0.0)
        for sl in range(S):
            hr, hl = float(home_r[d, sl]), float(home_l[d, sl])
            left = hr + hl
            j = d * S + sl
            for r in range(g):
                y_kind = np.floor(min(w[2, r], hr))
                u_kind = y_kind + np.floor(min(w[3, r], hl))
                u_work = np.floor(min(w[4, r], left))
                y_work = min(max(y_kind, u_work - hl), min(u_work, hr))
                score_kind = _move_score(u_kind, y_kind, left, Td, T[r], Xd, X[r], w[0, r], w[1, r], s, overhead,
                                         j_now)
                score_work = _move_score(u_work, y_work, left, Td, T[r], Xd, X[r], w[0, r], w[1, r], s, overhead,
                                         j_now)
                work = score_work > score_kind
                u = u_work if work else u_kind
                w[6, r] = u
                w[7, r] = y_work if work else y_kind
                score = score_work if work else score_kind
                w[5, r] = score if (u >= min_tokens and not blocked[j, r]) else -np.inf
            top, r = _first_max(w, 5)
            if top > best[5]:
                best = (float(d), float(sl), float(r), w[6, r], w[7, r], top)
    return best


@_inline
def _move_score(u, y, left, Td, Tr, Xd, Xr, T_other, X_other, s, overhead, j_now):
    """J's drop when a donor gives u pairs (y of them from other nodes) of a home slot holding `left` to a
    receiver, plus 0.001 per pair moved: of moves that lower J about as much, the largest (the donor sheds
    more for the replica slot it uses). X_other includes F."""
    shed = u + (overhead if u >= left else 0.0)                      # the home copy computes nothing
    T_new = max(Td - shed, Tr + u + overhead, T_other)
    X_new = max(Xd - y, Xr + y, X_other)
    return (j_now - (1 - s) * T_new - s * X_new) + 1e-3 * u


@_inline
def _best_exchange(T, X, topT, topX, home_r, home_l, blocked, used, sent, copies, d, floor, s, min_tokens, cap,
                   R, copy_cost, j_now, at_least, scratch):
    """The best exchange off donor d: its home expert a and another rank r's home expert b trade places for
    the micro-batch, each as a replica that takes all of the other's remaining pairs. Both home copies then
    run no GEMM, so unlike a move no call is added; it costs two copies. For each (a, r) the b whose pairs
    best even out d and r is taken (of equally close ones, the first). Scored like a move, less the
    copies' exposed cost where the exchange raises the node's busiest copier (copy_cost, in pairs of GEMM
    work); of equal scores the first in (a, r) order. As _best_move, every candidate is scored without a
    branch over receivers.

    Only an exchange scoring above at_least is sought (the greedy takes one only if it beats the best move):
    an expert a is skipped where a bound of its score, with any b of r's allowed slots, is not above at_least
    or the best so far (most are: the bound is O(g), the search O(g S)). So the result is the best exchange
    where that scores above at_least, and otherwise one scoring at most at_least. copies [g] and scratch
    [15 + 2 S, g]: work space. Returns (d, a, r, b, amount of a, its inter-node part, amount of b, its
    inter-node part, score; -inf when none is allowed or sought)."""
    g, S = home_r.shape
    best = (-1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -np.inf)
    if sent[d] >= cap or used[d] == R:
        return best
    # copies [g]: the replicas each rank sends or receives, whichever is more; scratch rows, per rank r:
    # 1 T_other, 2 X_other, 3 C_other (the most copies of ranks other than d and r), 4 whether r can take
    # part, 5 the b closest to the wanted amount, 6 how far its pairs are from it, 7 the score, 8 half the gap
    # T[d] - T[r], 9-10 b's amount and inter-node part, 11-14 the least and most pairs of r's allowed slots
    # and of their inter-node parts (for the bound); 15 + k: the pairs left at r's slot k where d may take
    # them (inf where not), 15 + S + k: their inter-node part
    w = scratch
    for r in range(g):
        copies[r] = max(used[r], sent[r])
    topC = _top3(copies)
    C_max = _vmax(copies)
    _max_excluding_each(T, topT, d, w, 1)
    _max_excluding_each(X, topX, d, w, 2)
    _max_excluding_each(copies, topC, d, w, 3)
    Td, Xd, Cd = T[d], X[d], copies[d]
    for r in range(g):
        w[2, r] = max(w[2, r], floor)
        w[4, r] = 1.0 if (used[r] != R and sent[r] < cap) else 0.0
        w[8, r] = (Td - T[r]) / 2
        w[11, r], w[12, r], w[13, r], w[14, r] = np.inf, -np.inf, np.inf, -np.inf
        for k in range(S):
            left = float(home_r[r, k] + home_l[r, k])
            allowed = not blocked[r * S + k, d] and left >= min_tokens
            w[15 + k, r] = left if allowed else np.inf
            w[15 + S + k, r] = float(home_r[r, k])
            w[11, r] = min(w[11, r], left) if allowed else w[11, r]
            w[12, r] = max(w[12, r], left) if allowed else w[12, r]
            w[13, r] = min(w[13, r], float(home_r[r, k])) if allowed else w[13, r]
            w[14, r] = max(w[14, r], float(home_r[r, k])) if allowed else w[14, r]
    for a in range(S):
        uA = float(home_r[d, a] + home_l[d, a])
        yA = float(home_r[d, a])
        if uA < min_tokens:
            continue
        # the bound: T_new and X_new at least as with b's pairs at the ends of r's range, the tie-break term
        # at most as there, the copies' term as it is. A margin for rounding: skip only where clearly below.
        bound = -np.inf
        for r in range(g):
            T_low = max(Td - uA + w[11, r], T[r] - w[12, r] + uA, w[1, r])
            X_low = max(Xd - yA + w[13, r], X[r] - w[14, r] + yA, w[2, r])
            C_new = max(max(Cd, copies[r]) + 1.0, w[3, r])
            b_score = ((j_now - (1 - s) * T_low - s * X_low) + 1e-3 * max(abs(uA - w[11, r]), abs(uA - w[12, r]))
                       - (1 - s) * copy_cost * (C_new - C_max))
            ok = w[4, r] > 0 and w[12, r] >= 0
            bound = max(bound, b_score if ok else -np.inf)
        if bound < max(at_least, best[8]) - 1e-9 * abs(j_now):
            continue
        # b on r: d must be able to take it; of those, the one that brings d and r closest together (the
        # slots in order, each over all ranks at once: the loop over ranks vectorises)
        for r in range(g):
            w[5, r], w[6, r], w[9, r], w[10, r] = -1.0, np.inf, 0.0, 0.0
        for k in range(S):
            for r in range(g):
                left = w[15 + k, r]
                miss = abs(left - (uA - w[8, r]))
                closer = miss < w[6, r]
                w[5, r] = k if closer else w[5, r]
                w[6, r] = miss if closer else w[6, r]
                w[9, r] = left if closer else w[9, r]
                w[10, r] = w[15 + S + k, r] if closer else w[10, r]
        j = d * S + a
        for r in range(g):
            uB, yB = w[9, r], w[10, r]
            T_new = max(Td - uA + uB, T[r] - uB + uA, w[1, r])
            X_new = max(Xd - yA + yB, X[r] - yB + yA, w[2, r])
            C_new = max(max(Cd, copies[r]) + 1.0, w[3, r])
            score = ((j_now - (1 - s) * T_new - s * X_new) + 1e-3 * abs(uA - uB)
                     - (1 - s) * copy_cost * (C_new - C_max))
            ok = w[4, r] > 0 and w[5, r] >= 0 and not blocked[j, r]
            w[7, r] = score if ok else -np.inf
        top, r = _first_max(w, 7)
        if top > best[8]:
            best = (float(d), float(a), float(r), w[5, r], uA, yA, w[9, r], w[10, r], top)
    return best


@_jit_no_nrt
def _shortest_equal_prefix(peak_T, peak_R, chosen, keep, floor):
    """Fewer steps for the nodes that do not set their layer's time: each node's shortest prefix of its
    chosen run's steps whose busiest rank and NIC stay within the layer's maxima (over its nodes, at their
    kept steps). peak_T, peak_R: [runs, N, steps + 1]; keep [N] is updated."""
    N = len(keep)
    T_star, R_star = -np.inf, floor
    for n in range(N):
        T_star = max(T_star, peak_T[chosen[n], n, keep[n]])
        R_star = max(R_star, peak_R[chosen[n], n, keep[n]])
    for n in range(N):
        for k in range(keep[n] + 1):
            if peak_T[chosen[n], n, k] <= T_star + 1e-6 and peak_R[chosen[n], n, k] <= R_star + 1e-6:
                keep[n] = k
                break


@_jit_no_nrt
def _write_replicas(counts, node_sum, expert_at_home, node_ranks, n, S, picks, step_of, n_picks, keep,
                    replica_expert, replica_quota, sources, order, rem):
    """The picks of node n's kept steps (step < keep) as replicas and quotas. counts [G, E] of the
    (micro-batch, layer), node_sum [N, E] its sums per node (_slot_loads); replica_expert [G, R] and
    replica_quota [G, R, G] of it are written. sources [G]:
    node n's ranks, then the other nodes' in node-block order. order [>= n_picks] and rem [G]: scratch."""
    g = node_ranks.shape[1]
    kept = 0
    while kept < n_picks and step_of[kept] < keep:
        kept += 1
    # replicas of one expert together, by holder rank: (node-local expert, receiver), each pick's own key
    for i in range(kept):
        key = (picks[i, 0] * S + picks[i, 1]) * g + picks[i, 2]
        at = i
        while at > 0 and (picks[order[at - 1], 0] * S + picks[order[at - 1], 1]) * g + picks[order[at - 1], 2] > key:
            order[at] = order[at - 1]
            at -= 1
        order[at] = i
    i = 0
    while i < kept:
        j = i
        d, sl = picks[order[i], 0], picks[order[i], 1]
        while j < kept and picks[order[j], 0] == d and picks[order[j], 1] == sl:
            j += 1
        home = node_ranks[n, d]
        expert = expert_at_home[home * S + sl]
        _write_quotas(counts, node_sum, expert, picks, order, i, j, home, node_ranks, n, replica_quota, sources,
                      rem)
        for q in range(i, j):
            replica_expert[node_ranks[n, picks[order[q], 2]], picks[order[q], 3]] = expert
        i = j


@_inline
def _write_quotas(counts, node_sum, expert, picks, order, begin, end, home, node_ranks, n, replica_quota, sources,
                  rem):
    """Split one expert's replicas' amounts over the source ranks (module docstring). counts [G, E]: the
    pairs of each source, node_sum [N, E] their sums per node (_slot_loads); picks[order[begin:end]]: the
    expert's replicas, by holder; home: its home rank on node n; sources: as _write_replicas. Writes
    replica_quota[holder, k, :] of each. rem [G]: scratch, the pairs left at node n's sources (the other
    nodes' sources lose none before the replicas take theirs: they are read from counts)."""
    N, g = node_ranks.shape
    total = 0
    for k in range(N):
        total += node_sum[k, expert]
    local_pool = node_sum[n, expert]
    for i in range(g):
        rem[node_ranks[n, i]] = counts[node_ranks[n, i], expert]
    amount_sum = 0
    remote_sum = 0
    for q in range(begin, end):
        idx = order[q]
        holder = node_ranks[n, picks[idx, 2]]
        a, y = picks[idx, 4], picks[idx, 5]
        own = min(counts[holder, expert], a - y)                        # its own rank's pairs never leave the GPU
        rem[holder] -= own
        amount_sum += a
        remote_sum += y
    home_amount = total - amount_sum
    home_remote = (total - local_pool) - remote_sum
    rem[home] -= min(counts[home, expert], home_amount - home_remote)
    # each replica takes the next pairs of the sources laid end to end: cursors (source, pairs taken of it)
    G = len(sources)
    remote, remote_taken, local, local_taken = g, 0, 0, 0
    for q in range(begin, end):
        idx = order[q]
        holder = node_ranks[n, picks[idx, 2]]
        k, a, y = picks[idx, 3], picks[idx, 4], picks[idx, 5]
        own = min(counts[holder, expert], a - y)
        # inter-node pairs: the other nodes' sources in node-block order
        remote, remote_taken = _take_in_order(counts, expert, rem, False, sources, G, remote, remote_taken, y,
                                              replica_quota, holder, k)
        # intra-node pairs beyond its own: the home node's sources in rank order
        local, local_taken = _take_in_order(counts, expert, rem, True, sources, g, local, local_taken,
                                            a - own - y, replica_quota, holder, k)
        replica_quota[holder, k, holder] += own


@_inline
def _take_in_order(counts, expert, rem, home_node, sources, end, at, taken, amount, replica_quota, holder, k):
    """Northwest-corner rule: the sources up to sources[end - 1] are used up in order; from the cursor (the
    at-th source, `taken` of its pairs gone) replica_quota[holder, k] takes `amount` pairs. A source holds
    rem[source] pairs on the home node, counts[source, expert] on the others. Returns the cursor after
    them. (Indexed in place, not through row views: a view costs reference counts.)"""
    while amount > 0 and at < end:
        rank = sources[at]
        left = (rem[rank] if home_node else counts[rank, expert]) - taken
        if left > amount:
            replica_quota[holder, k, rank] += amount
            return at, taken + amount
        if left > 0:
            replica_quota[holder, k, rank] += left
            amount -= left
        at, taken = at + 1, 0
    return at, taken
