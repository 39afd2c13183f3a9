"""The co-placement planner (relibra_verl.planner.locality): verl's constraints kept, pairs kept on their
node where the routing has structure, verl's placement kept where it has none."""
from __future__ import annotations

import numpy as np
import pytest

from relibra_verl.planner.locality import (LocalityConfig, count_routed_pairs, inter_node_fraction, plan_locality,
                                           usage_from_routes, verl_workload)
from relibra_verl.planner.types import PlanError


def _two_domains(seed=0, S=64, L=3, E=16, K=2, D=8, shared=False):
    """Sequences of two domains, each routing only to its own half of the experts (shared: every sequence
    routes anywhere); lengths drawn alike for both. verl's ranks: round robin (domains mixed on every node)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(5, 40, size=S)
    domain = np.arange(S) % 2
    usage = np.zeros((S, L, E), np.int64)
    for s in range(S):
        pool = np.arange(E) if shared else np.arange(E // 2) + domain[s] * (E // 2)
        for l in range(L):
            for _ in range(lens[s]):
                usage[s, l, rng.choice(pool, size=K, replace=False)] += 1
    verl_rank = np.arange(S) % D
    return usage, lens, verl_rank, domain


def test_two_domains_stay_on_their_node():
    usage, lens, verl_rank, domain = _two_domains()
    node_of_rank = np.arange(8) // 4                                     # 2 nodes x 4 ranks
    p = plan_locality(usage, lens, node_of_rank, verl_rank)
    assert not p.fell_back and p.reason == ""
    assert p.verl_fraction > 0.4 and p.inter_node_fraction < 0.5 * p.verl_fraction
    # the figure it reports is the one its placement has
    assert p.inter_node_fraction == pytest.approx(inter_node_fraction(usage, node_of_rank[p.rank_of_seq], p.node_of_expert))
    # verl's constraints: every rank keeps its count, every node E / N experts per layer, workload in tolerance
    np.testing.assert_array_equal(np.bincount(p.rank_of_seq, minlength=8), np.bincount(verl_rank, minlength=8))
    assert (np.stack([np.bincount(row, minlength=2) for row in p.node_of_expert]) == 8).all()
    w = verl_workload(lens)
    peak = np.bincount(p.rank_of_seq, weights=w, minlength=8).max()
    assert peak <= np.bincount(verl_rank, weights=w, minlength=8).max() * 1.05
    # deterministic
    q = plan_locality(usage, lens, node_of_rank, verl_rank)
    np.testing.assert_array_equal(q.rank_of_seq, p.rank_of_seq)
    np.testing.assert_array_equal(q.node_of_expert, p.node_of_expert)


def test_minibatches_keep_their_sequences_and_counts():
    usage, lens, verl_rank, _ = _two_domains(S=64)
    minibatch = (np.arange(64) // 16) % 4                                # 4 mini-batches of 16 (2 per rank)
    verl_rank = np.arange(64) % 8
    p = plan_locality(usage, lens, np.arange(8) // 4, verl_rank, minibatch=minibatch)
    assert not p.fell_back
    for b in range(4):
        idx = minibatch == b
        np.testing.assert_array_equal(np.bincount(p.rank_of_seq[idx], minlength=8), np.bincount(verl_rank[idx], minlength=8))


def test_falls_back_without_structure_and_on_one_node():
    usage, lens, verl_rank, _ = _two_domains(shared=True)
    p = plan_locality(usage, lens, np.arange(8) // 4, verl_rank, config=LocalityConfig(min_gain=0.1))
    assert p.fell_back and p.reason.startswith("gain") and p.node_of_expert is None
    np.testing.assert_array_equal(p.rank_of_seq, verl_rank)
    one = plan_locality(usage, lens, np.zeros(8, np.int64), verl_rank)
    assert one.fell_back and one.reason == "one node" and one.inter_node_fraction == 0.0


def test_workload_tolerance_is_kept():
    # one domain's sequences long, the other's short: co-placing by domain would unbalance the ranks
    usage, lens, verl_rank, domain = _two_domains(seed=3)
    lens = np.where(domain == 0, 60, 6)
    for tol in (0.0, 0.02, 0.3):
        p = plan_locality(usage, lens, np.arange(8) // 4, verl_rank, config=LocalityConfig(workload_tolerance=tol, min_gain=0))
        w = verl_workload(lens)
        assert np.bincount(p.rank_of_seq, weights=w, minlength=8).max() <= np.bincount(verl_rank, weights=w, minlength=8).max() * (1 + tol)


def test_bad_input_is_named():
    usage, lens, verl_rank, _ = _two_domains()
    with pytest.raises(PlanError, match="usage"):
        plan_locality(usage[0], lens, np.arange(8) // 4, verl_rank)
    with pytest.raises(PlanError, match="same number of DP ranks"):
        plan_locality(usage, lens, np.array([0, 0, 0, 1, 1, 1, 1, 1]), verl_rank)
    with pytest.raises(PlanError, match="verl_rank"):
        plan_locality(usage, lens, np.arange(8) // 4, verl_rank[:-1])
    with pytest.raises(PlanError, match="prev_node_of_expert"):
        plan_locality(usage, lens, np.arange(8) // 4, verl_rank, prev_node_of_expert=np.zeros((3, 16), np.int64))


def test_usage_from_routes_counts_pairs():
    ids = np.array([[[0, 1]], [[1, -1]], [[2, 0]]])                      # 3 tokens, 1 layer, top-2
    u = usage_from_routes(ids, np.array([0, 2, 3]), 3)
    np.testing.assert_array_equal(u[:, 0], [[1, 2, 0], [1, 0, 1]])


def test_busiest_node_cross_pairs_by_hand_and_the_fall_back_rule():
    """_busiest_cross: per layer the node sending or receiving most pairs across nodes. Two nodes, one layer,
    two experts (expert 0 on node 0): sequence 0 on node 0 sends 3 pairs to expert 1 (node 1), sequence 1
    on node 1 sends 5 pairs to expert 0 and 1 to expert 1: node 0 sends 3 and receives 5, node 1 sends 5
    and receives 3 -> 5."""
    from relibra_verl.planner.locality import _busiest_cross

    flat = np.array([[0.0, 3.0], [5.0, 1.0]])
    assert _busiest_cross(flat, np.array([0, 1]), np.array([[0, 1]]), 2) == 5.0
    assert _busiest_cross(flat, np.array([1, 0]), np.array([[0, 1]]), 2) == 1.0
    # the rule: a structured batch gains far more than min_gain; at a min_gain above its gain it falls back
    usage, lens, verl_rank, _ = _two_domains()
    p = plan_locality(usage, lens, np.arange(8) // 4, verl_rank)
    assert 0.3 < p.nic_gain <= 1.0 and not p.fell_back
    q = plan_locality(usage, lens, np.arange(8) // 4, verl_rank, config=LocalityConfig(min_gain=p.nic_gain + 1e-6))
    assert q.fell_back and "busiest node" in q.reason and q.nic_gain == pytest.approx(p.nic_gain)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_count_routed_pairs_matches_bincount(dtype):
    rng = np.random.default_rng(3)
    routes = rng.integers(0, 60, size=(37, 5, 4)).astype(dtype)
    routes[:, 2] = 0                                                    # a dense layer: every route 0
    want = np.stack([np.bincount(routes[:, layer].reshape(-1).astype(np.int64), minlength=60)
                     for layer in range(5)])[:, :int(routes.max()) + 1]
    got = count_routed_pairs(routes)
    assert got.dtype == np.int32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert count_routed_pairs(routes[:0]).shape == (5, 1)               # no valid token: no pairs


def test_count_routed_pairs_names_bad_routes():
    with pytest.raises(PlanError, match="negative expert id"):
        count_routed_pairs(np.array([[[1, -2]]], dtype=np.int64))
    with pytest.raises(PlanError, match="integer expert ids"):
        count_routed_pairs(np.zeros((2, 1, 2), dtype=np.float32))
    with pytest.raises(PlanError, match="tokens, layers, top-k"):
        count_routed_pairs(np.zeros((2, 2), dtype=np.int64))
