"""The replication greedy's compiled step kernels and quota writer against plain versions of their rules.

The compiled kernels score every candidate without branches and pick the best afterwards, and the quota
writer walks the sources with cursors; the plain versions below enumerate the candidates one by one and lay
the sources end to end, as the rules read (relibra_verl/planner/replicate.py). Plans must be bit-identical:
the same candidate (the first of equal scores) and the same score, to the last bit."""
from __future__ import annotations

import math

import numpy as np
import pytest

from relibra_verl.planner import ReplicationConfig, Topology, plan_replicas
from relibra_verl.planner.replicate import _best_exchange, _best_move, _top3


def _mean(v):
    return sum(float(x) for x in v) / len(v)                         # in index order, as the kernels sum


def _max_excluding(v, d, r):
    return max((float(v[i]) for i in range(len(v)) if i != d and i != r), default=-math.inf)


def _towards_mean(have_d, have_r, mean, overhead, min_tokens, last):
    excess = max(have_d - mean, 0.0)
    deficit = mean - have_r - overhead
    if deficit >= min_tokens:
        return deficit if last else min(deficit, excess)
    return min((have_d - have_r - overhead) / 2, excess)


def _move_score(u, y, left, Td, Tr, Xd, Xr, T_other, X_other, s, overhead, j_now):
    shed = u + (overhead if u >= left else 0.0)
    T_new = max(Td - shed, Tr + u + overhead, T_other)
    X_new = max(Xd - y, Xr + y, X_other)
    return (j_now - (1 - s) * T_new - s * X_new) + 1e-3 * u


def reference_best_move(T, X, home_r, home_l, blocked, used, sent, d1, d2, floor, s, overhead, min_tokens, cap, R,
                        j_now):
    """Every (donor, slot, receiver) in order, both amount rules, the first best score kept."""
    g, S = home_r.shape
    x_mean, t_mean = _mean(X), _mean(T)
    best = (-1.0, -1.0, -1.0, 0.0, 0.0, -math.inf)
    for i, d in enumerate((d1, d2)):
        if d < 0 or sent[d] >= cap or (i == 1 and d == d1):
            continue
        for sl in range(S):
            hr, hl = float(home_r[d, sl]), float(home_l[d, sl])
            left = hr + hl
            for r in range(g):
                if blocked[d * S + sl, r]:
                    continue
                last = R - used[r] == 1
                T_other = _max_excluding(T, d, r)
                X_other = max(_max_excluding(X, d, r), floor)
                y_kind = np.floor(min(max(min(x_mean - X[r], X[d] - x_mean), 0.0), hr))
                u_kind = y_kind + np.floor(min(max(_towards_mean(T[d] - X[d], T[r] - X[r], t_mean - x_mean, overhead,
                                                                 min_tokens, last), 0.0), hl))
                u_work = np.floor(min(max(_towards_mean(T[d], T[r], t_mean, overhead, min_tokens, last), 0.0), left))
                y_work = min(max(y_kind, u_work - hl), min(u_work, hr))
                score_kind = _move_score(u_kind, y_kind, left, T[d], T[r], X[d], X[r], T_other, X_other, s, overhead,
                                         j_now)
                score_work = _move_score(u_work, y_work, left, T[d], T[r], X[d], X[r], T_other, X_other, s, overhead,
                                         j_now)
                u, y, score = (u_work, y_work, score_work) if score_work > score_kind else (u_kind, y_kind, score_kind)
                if u >= min_tokens and score > best[5]:
                    best = (float(d), float(sl), float(r), u, y, score)
    return best


def reference_best_exchange(T, X, home_r, home_l, blocked, used, sent, d, floor, s, min_tokens, cap, R, copy_cost,
                            j_now):
    """Every (a, r) in order, r's b the closest to the wanted amount, the first best score kept."""
    g, S = home_r.shape
    best = (-1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -math.inf)
    if sent[d] >= cap or used[d] == R:
        return best
    copies = [float(max(used[r], sent[r])) for r in range(g)]
    for a in range(S):
        uA, yA = float(home_r[d, a] + home_l[d, a]), float(home_r[d, a])
        if uA < min_tokens:
            continue
        for r in range(g):
            if blocked[d * S + a, r] or used[r] == R or sent[r] >= cap:
                continue
            want = uA - (T[d] - T[r]) / 2
            b, miss = -1, math.inf
            for k in range(S):
                left = float(home_r[r, k] + home_l[r, k])
                if not blocked[r * S + k, d] and left >= min_tokens and abs(left - want) < miss:
                    b, miss = k, abs(left - want)
            if b < 0:
                continue
            uB, yB = float(home_r[r, b] + home_l[r, b]), float(home_r[r, b])
            T_new = max(T[d] - uA + uB, T[r] - uB + uA, _max_excluding(T, d, r))
            X_new = max(X[d] - yA + yB, X[r] - yB + yA, max(_max_excluding(X, d, r), floor))
            C_new = max(max(copies[d], copies[r]) + 1.0, _max_excluding(copies, d, r))
            score = ((j_now - (1 - s) * T_new - s * X_new) + 1e-3 * abs(uA - uB)
                     - (1 - s) * copy_cost * (C_new - max(copies)))
            if score > best[8]:
                best = (float(d), float(a), float(r), float(b), uA, yA, uB, yB, score)
    return best


def _random_state(rng, g, S, R):
    """A node mid-greedy: loads on a coarse grid (ties), some replicas placed, full receivers blocked."""
    home_r = rng.choice([0, 5, 40, 40, 120], size=(g, S)).astype(np.int64)
    home_l = rng.choice([0, 10, 60, 60, 200], size=(g, S)).astype(np.int64)
    used = rng.integers(0, R + 1, size=g).astype(np.int64)
    sent = rng.integers(0, R + 1, size=g).astype(np.int64)
    T = (home_r + home_l).sum(1) + 30.0 * used + rng.choice([0.0, 50.0], size=g)
    X = home_r.sum(1) + rng.choice([0.0, 20.0], size=g)
    blocked = rng.random((g * S, g)) < 0.2
    for j in range(g * S):
        blocked[j, j // S] = True
    blocked[:, used == R] = True
    return T, X, home_r, home_l, blocked, used, sent


@pytest.mark.parametrize("g, S, R", [(8, 4, 2), (4, 2, 1), (3, 3, 3), (8, 1, 2), (16, 2, 2)])
def test_step_kernels_match_the_plain_rules_bit_for_bit(g, S, R):
    rng = np.random.default_rng(g * 100 + S * 10 + R)
    scratch = np.zeros((15 + 2 * S, g))
    copies = np.zeros(g)
    checked = exchanges = above = below = 0
    for trial in range(300):
        T, X, home_r, home_l, blocked, used, sent = _random_state(rng, g, S, R)
        s = float(rng.choice([0.0, 0.5, 0.9]))
        floor = float(rng.choice([0.0, X.mean(), X.max() + 10]))
        overhead = float(rng.choice([0.0, 25.0]))
        min_tokens = int(rng.choice([1, 30]))
        cap = int(rng.choice([R * (g - 1), 1]))
        copy_cost = float(rng.choice([0.0, 7.5]))
        j_now = (1 - s) * T.max() + s * max(X.max(), floor)
        topT, topX = _top3(T), _top3(X)
        d1, d2 = topT[0], int(rng.choice([topX[0], -1]))
        got = _best_move(T, X, topT, topX, home_r, home_l, blocked, used, sent, d1, d2, floor, s, overhead, min_tokens,
                         cap, R, j_now, scratch)
        want = reference_best_move(T, X, home_r, home_l, blocked, used, sent, d1, d2, floor, s, overhead, min_tokens,
                                   cap, R, j_now)
        assert got == want, (trial, got, want)
        d = int(rng.choice([topT[0], topX[0], int(rng.integers(g))]))
        want = reference_best_exchange(T, X, home_r, home_l, blocked, used, sent, d, floor, s, min_tokens, cap, R,
                                       copy_cost, j_now)
        # every exchange sought (at_least -inf): the best, bit for bit; the greedy uses an exchange only where
        # it lowers J more than the best move: there both must agree; below that, which of the unused
        # candidates comes back does not matter, only that none beats it
        got = _best_exchange(T, X, topT, topX, home_r, home_l, blocked, used, sent, copies, d, floor, s, min_tokens,
                             cap, R, copy_cost, j_now, -math.inf, scratch)
        if max(got[8], want[8]) > -math.inf:
            assert got == want, (trial, got, want)
            exchanges += 1
        # only exchanges above at_least sought (the greedy's: above its best move), at_least drawn around the
        # best exchange's score so that both sides of it are checked
        if want[8] > -math.inf:
            at_least = want[8] + float(rng.choice([-50.0, -1.0, -1e-6, 0.0, 1.0]))
            got = _best_exchange(T, X, topT, topX, home_r, home_l, blocked, used, sent, copies, d, floor, s,
                                 min_tokens, cap, R, copy_cost, j_now, at_least, scratch)
            if want[8] > at_least:
                assert got == want, (trial, at_least, got, want)
                above += 1
            else:
                assert got[8] <= at_least, (trial, at_least, got, want)
                below += 1
        checked += 1
    assert checked == 300 and exchanges > 20                           # the exchange path was exercised
    assert above > 10 and below > 10                                    # both sides of at_least


def _quotas_by_the_rule(src, holders, amounts, remote, home, node_ranks, n):
    """One expert's replicas (in holder order) and their amounts -> quota rows [len(holders), G]: each takes its
    own rank's pairs first, then its inter-node pairs from the other nodes' sources laid end to end in
    node-block order and its other intra-node pairs from the home node's sources in rank order; the home
    keeps the rest (its own pairs first)."""
    G = len(src)
    on_node = np.zeros(G, dtype=bool)
    on_node[node_ranks[n]] = True
    own = [min(src[h], a - y) for h, a, y in zip(holders, amounts, remote)]
    rem = src.astype(np.int64).copy()
    for h, o in zip(holders, own):
        rem[h] -= o
    home_local = (src.sum() - sum(amounts)) - ((src[~on_node].sum()) - sum(remote))
    rem[home] -= min(src[home], home_local)
    remote_order = [r for m in range(len(node_ranks)) if m != n for r in node_ranks[m]]
    local_order = list(node_ranks[n])
    rows = np.zeros((len(holders), G), dtype=np.int64)
    begin = {"remote": 0, "local": 0}
    for q, (h, a, y, o) in enumerate(zip(holders, amounts, remote, own)):
        for kind, order, amount in (("remote", remote_order, y), ("local", local_order, a - o - y)):
            lo, hi, at = begin[kind], begin[kind] + amount, 0
            for r in order:                                           # the sources end to end: [at, at + rem[r])
                rows[q, r] += max(0, min(at + rem[r], hi) - max(at, lo))
                at += rem[r]
            begin[kind] = hi
        rows[q, h] += o
    return rows


@pytest.mark.parametrize("ep, gpus_per_node, R, share", [(8, 4, 2, 0.8), (12, 4, 1, 0.5), (8, 8, 2, 0.0), (16, 4, 3, 0.9)])
def test_quotas_follow_the_rule_for_every_replicated_expert(ep, gpus_per_node, R, share):
    E = ep * 2
    topo = Topology(num_experts=E, ep_size=ep, gpus_per_node=gpus_per_node, replica_slots=R)
    rng = np.random.default_rng(ep + R)
    pop = rng.gamma(0.5, size=E) + 0.05
    counts = rng.poisson(pop * 40, size=(2, 3, ep, E)).astype(np.int64)
    placement = np.stack([rng.permutation(E) for _ in range(3)])
    config = ReplicationConfig(replica_overhead_pairs=10.0, inter_node_share=share, copy_cost_pairs=3.0)
    rep_e, rep_q, _ = plan_replicas(counts, topo, placement, config)
    node_ranks = topo.node_ranks()
    home_of = np.argsort(placement, axis=1) // topo.S                   # [L, E] home rank of each expert
    checked = 0
    for m in range(2):
        for l in range(3):
            for e in np.unique(rep_e[m, l][rep_e[m, l] >= 0]):
                where = np.argwhere(rep_e[m, l] == e)                    # (holder, slot) in holder order
                rows = rep_q[m, l, where[:, 0], where[:, 1]].astype(np.int64)
                home = home_of[l, e]
                n = topo.node_of_rank[home]
                off_node = np.ones(topo.G, dtype=bool)
                off_node[node_ranks[n]] = False
                expected = _quotas_by_the_rule(counts[m, l, :, e], list(where[:, 0]), list(rows.sum(1)),
                                               list(rows[:, off_node].sum(1)), home, node_ranks, n)
                assert np.array_equal(rows, expected), (m, l, e)
                checked += 1
    assert checked > 5
