"""Planners: EPLB reference vector, invariants 1-3 for every strategy, adversarial loads, bad input."""
import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relibra_verl.planner.eplb import rebalance_experts
from relibra_verl.planner.relibra import ReplicationConfig, plan_relibra
from relibra_verl.planner.strategies import STRATEGIES, plan_outcome, run_strategy
from relibra_verl.planner.types import BatchPlan, PlanError, Topology, identity_placement
from relibra_verl.planner.validate import check_deterministic, validate_plan

# ../shared/reference/facts.md: the DeepSeek EPLB README example (also vLLM's test_eplb_algo.py)
EPLB_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
               [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
EPLB_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
EPLB_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def test_eplb_reproduces_reference_vector():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(EPLB_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == EPLB_PHY2LOG
    assert logcnt.tolist() == EPLB_LOGCNT
    for l in range(2):
        for e in range(12):
            copies = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(copies) == logcnt[l, e] and (phy2log[l, copies] == e).all()


@pytest.mark.parametrize("groups, nodes", [(4, 2), (1, 2), (3, 2)])  # hierarchical, global, global (3 % 2)
def test_eplb_properties(groups, nodes):
    w = np.random.default_rng(0).integers(0, 1000, size=(3, 12))
    phy2log, _, logcnt = rebalance_experts(w, 24, groups, nodes, 8)
    for l in range(3):
        assert np.array_equal(np.bincount(phy2log[l], minlength=12), logcnt[l])
        assert logcnt[l].min() >= 1
    # more copies go to heavier experts: the max load per copy is no worse than with no redundancy
    assert (w / logcnt).max() <= w.max()


def counts_strategy(max_g=8):
    @st.composite
    def build(draw):
        nodes = draw(st.integers(1, 3))
        g = draw(st.sampled_from([1, 2, 4]))
        G = nodes * g
        S = draw(st.integers(1, 3))
        E = G * S
        R = draw(st.integers(0, 3))
        M = draw(st.integers(1, 3))
        L = draw(st.integers(1, 3))
        kind = draw(st.sampled_from(["random", "one_expert", "empty", "zipf", "empty_rank"]))
        seed = draw(st.integers(0, 2 ** 16))
        rng = np.random.default_rng(seed)
        if kind == "random":
            c = rng.integers(0, 50, size=(M, L, G, E))
        elif kind == "one_expert":
            c = np.zeros((M, L, G, E), dtype=np.int64)
            c[..., rng.integers(E)] = rng.integers(1, 500)
        elif kind == "empty":
            c = np.zeros((M, L, G, E), dtype=np.int64)
        elif kind == "empty_rank":
            c = rng.integers(0, 100, size=(M, L, G, E))
            c[:, :, rng.integers(G)] = 0
            c[rng.integers(M)] = 0
        else:
            p = 1.0 / np.arange(1, E + 1) ** 1.5
            c = rng.multinomial(200, rng.permutation(p / p.sum()), size=(M, L, G))
        return Topology(E, G, g, R), c.astype(np.int64)
    return build()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts_strategy())
def test_every_planner_keeps_invariants(case):
    topo, counts = case
    M, L, G, E = counts.shape
    for name in STRATEGIES:
        res = run_strategy(name, counts, topo, history_counts=counts[::-1])
        # invariant 1: every routed pair is computed exactly once
        np.testing.assert_allclose(res.rank_tokens.sum(-1), counts.sum((2, 3)))
        np.testing.assert_allclose(res.traffic.sum(-1), counts.sum(-1))
        assert (res.traffic >= -1e-9).all()
        if res.plan is not None:
            validate_plan(res.plan, counts)
            check_deterministic(lambda: run_strategy(name, counts, topo).plan)
    base = run_strategy("megatron", counts, topo)
    rep = run_strategy("relibra-replicate", counts, topo)
    nodes = np.asarray(topo.node_of_rank)
    if topo.num_nodes == 1:
        # one node: replication only ever moves pairs off the busiest rank, never raises the peak
        assert (rep.rank_tokens.max(-1) <= base.rank_tokens.max(-1)).all()
    else:
        # several: no layer's critical path (the planner's objective: busiest rank's pairs and busiest NIC,
        # weighted by inter_node_share) ever rises
        s = ReplicationConfig().inter_node_share
        cross = nodes[:, None] != nodes[None, :]

        def objective(res):
            nic = np.maximum((res.traffic * cross).sum(2).max(-1), (res.traffic * cross).sum(3).max(-1))
            return (1 - s) * res.rank_tokens.max(-1) + s * nic
        assert (objective(rep) <= objective(base) + 1e-6).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts_strategy(), st.sampled_from([(50.0, 0.0), (300.0, 20.0), (1000.0, 200.0)]))
def test_time_aware_replication_keeps_invariants_and_never_lengthens_a_layer(case, costs):
    # with a GEMM-call cost the planner also exchanges experts between ranks: every plan is still valid,
    # deterministic, computes every pair once, and no layer's critical path (GEMM work with its calls,
    # busiest NIC) rises above the unreplicated one
    topo, counts = case
    overhead, copy_cost = costs
    cfg = ReplicationConfig(replica_overhead_pairs=overhead, copy_cost_pairs=copy_cost)
    plan = plan_relibra(counts, topo, mode="replicate", replication=cfg)
    validate_plan(plan, counts)
    check_deterministic(lambda: plan_relibra(counts, topo, mode="replicate", replication=cfg))
    base = plan_relibra(counts, dataclasses.replace(topo, replica_slots=0), mode="replicate")
    nodes = np.asarray(topo.node_of_rank)
    cross = nodes[:, None] != nodes[None, :]
    s = cfg.inter_node_share if topo.num_nodes > 1 else 0.0

    def objective(p):
        tokens, traffic, calls = plan_outcome(p, counts)
        np.testing.assert_allclose(tokens.sum(-1), counts.sum((2, 3)))
        nic = np.maximum((traffic * cross).sum(2).max(-1), (traffic * cross).sum(3).max(-1))
        return (1 - s) * (tokens + overhead * calls).max(-1) + s * nic
    assert (objective(plan) <= objective(base) + 1e-3).all()


def test_an_exchange_balances_two_ranks_without_a_gemm_call():
    # one node of 2 ranks, 2 experts each: rank 0 holds 700 + 300 pairs, rank 1 500 + 100; a GEMM call costs
    # 300 pairs. The best move (50 pairs of expert 0 to rank 1) leaves GEMM work 950 + 2 calls and 650 + 3
    # calls (1550 each); exchanging expert 0 (700) with expert 2 (500) leaves 800 + 2 calls on each (1400)
    counts = np.zeros((1, 1, 2, 4), dtype=np.int64)
    counts[0, 0, 0] = [700, 300, 500, 100]                               # all pairs from rank 0
    topo = Topology(4, 2, 2, 1)
    plan = plan_relibra(counts, topo, mode="replicate",
                        replication=ReplicationConfig(replica_overhead_pairs=300, copy_cost_pairs=10))
    validate_plan(plan, counts)
    tokens, _, calls = plan_outcome(plan, counts)
    assert tokens[0, 0].tolist() == [800, 800] and calls[0, 0].tolist() == [2, 2]
    assert plan.replica_expert[0, 0, :, 0].tolist() == [2, 0]            # each holds the other's expert
    # when the two copies cost more than the exchange gains, the planner moves instead (or does nothing)
    dear = plan_relibra(counts, topo, mode="replicate",
                        replication=ReplicationConfig(replica_overhead_pairs=300, copy_cost_pairs=1e6))
    assert plan_outcome(dear, counts)[2][0, 0].sum() > 4 or (dear.replica_expert < 0).all()


def test_replication_balances_one_node_exactly_enough():
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 65) ** 1.2
    counts = rng.multinomial(8192 * 6, rng.permutation(p / p.sum()), size=(4, 5, 8))
    topo = Topology(64, 8, 8, 2)
    res = run_strategy("relibra-replicate", counts, topo)
    before = run_strategy("megatron", counts, topo).imbalance()
    assert np.median(before) > 1.2
    assert res.imbalance().max() < 1.01


def test_all_tokens_on_one_expert_spread_over_the_node():
    counts = np.zeros((1, 1, 4, 8), dtype=np.int64)
    counts[0, 0, :, 5] = 1000                       # every rank sends everything to expert 5 (home rank 2)
    topo = Topology(8, 4, 4, 1)
    plan = plan_relibra(counts, topo, mode="replicate")
    validate_plan(plan, counts)
    tokens, traffic, _ = plan_outcome(plan, counts)
    assert tokens[0, 0].tolist() == [1000, 1000, 1000, 1000]
    # each replica holder computes its own pairs locally first
    for r in (0, 1, 3):
        assert traffic[0, 0, r, r] == 1000


def test_replicas_stay_on_the_home_node():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 10, size=(2, 3, 8, 16))
    counts[:, :, :, 3] += 500
    topo = Topology(16, 8, 4, 2)
    plan = plan_relibra(counts, topo, mode="both")
    validate_plan(plan, counts)
    nodes = np.asarray(topo.node_of_rank)
    home_rank = plan.home_of_expert() // topo.S
    m, l, r, k = np.nonzero(plan.replica_expert >= 0)
    assert len(m) > 0
    assert (nodes[r] == nodes[home_rank[l, plan.replica_expert[m, l, r, k]]]).all()


def _inter_node_receive(traffic, topo):
    """[M, L, G] pairs each rank receives from other nodes."""
    nodes = np.asarray(topo.node_of_rank)
    return (traffic * (nodes[:, None] != nodes[None, :])).sum(2)


def test_equal_pairs_uneven_inter_node_receive_is_balanced():
    # node 0 = ranks 0, 1. Rank 0's expert 0 gets 1000 pairs from node 1, rank 1's expert 2 gets 1000 from
    # node 0 itself: equal pairs, but rank 0's NIC takes all of node 0's inter-node receive
    counts = np.zeros((1, 1, 4, 8), dtype=np.int64)
    counts[0, 0, 2, 0] = counts[0, 0, 3, 0] = 500
    counts[0, 0, 0, 2] = counts[0, 0, 1, 2] = 500
    topo = Topology(8, 4, 2, 2)
    plan = plan_relibra(counts, topo, mode="replicate")
    validate_plan(plan, counts)
    tokens, traffic, _ = plan_outcome(plan, counts)
    assert tokens[0, 0, :2].tolist() == [1000, 1000]
    assert _inter_node_receive(traffic, topo)[0, 0, :2].tolist() == [500, 500]
    # the replica of expert 2 on rank 0 computes rank 0's own pairs: nothing crosses NVLink
    assert traffic[0, 0, 0, 1] == traffic[0, 0, 1, 0] == 0


def _layer_peaks(tokens, traffic, topo):
    """[M, L] each layer's busiest InfiniBand NIC and busiest rank's pairs, over what no replication inside
    nodes can beat: the most any rank sends to other nodes (the data's and the placement's), or the
    largest node mean of what its ranks receive from other nodes; the largest node mean of pairs."""
    nodes = np.asarray(topo.node_of_rank)
    cross = traffic * (nodes[:, None] != nodes[None, :])
    M, L, G, _ = traffic.shape
    recv, sent = cross.sum(2), cross.sum(3)
    per_node = lambda x: x.reshape(M, L, topo.num_nodes, -1)
    nic = np.maximum(recv, sent).max(-1) / np.maximum(sent.max(-1), per_node(recv).mean(-1).max(-1))
    pairs = tokens.max(-1) / per_node(tokens).mean(-1).max(-1)
    return nic, pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replication_brings_each_layer_to_its_nic_and_pairs_bounds(seed):
    # every source rank has its own taste, and the ranks of a node hold experts whose pairs come from other
    # nodes in very different shares
    rng = np.random.default_rng(seed)
    G, g, E = 16, 4, 32
    topo = Topology(E, G, g, 2)
    popular = rng.dirichlet(np.full(E, 0.5), size=G)
    counts = np.stack([rng.multinomial(4096, popular[r], size=(3, 2)) for r in range(G)], axis=2)
    plan = plan_relibra(counts, topo, mode="replicate")
    validate_plan(plan, counts)
    nic, pairs = _layer_peaks(*plan_outcome(plan, counts)[:2], topo)
    nic0, pairs0 = _layer_peaks(*plan_outcome(plan_relibra(counts, dataclasses.replace(topo, replica_slots=0),
                                                           mode="replicate"), counts)[:2], topo)
    assert np.median(nic0) > 1.05 and np.median(pairs0) > 1.05
    assert np.median(nic) < 1.005 and nic.max() < 1.03
    assert np.median(pairs) < 1.005 and pairs.max() < 1.05


@pytest.mark.parametrize("seed", [0, 1])
def test_replication_evens_out_the_inter_node_receive_when_it_sets_the_time(seed):
    # one taste for all sources: every rank sends about the same to other nodes, and the receive side,
    # uneven over a node's ranks (their experts' popularity), sets the all-to-all's time
    rng = np.random.default_rng(seed)
    G, g, E = 16, 4, 32
    topo = Topology(E, G, g, 2)
    popular = rng.permutation(1.0 / np.arange(1, E + 1) ** 0.6)
    counts = rng.multinomial(4096, popular / popular.sum(), size=(3, 2, G))
    plan = plan_relibra(counts, topo, mode="replicate")
    validate_plan(plan, counts)
    tokens, traffic, _ = plan_outcome(plan, counts)
    nic, pairs = _layer_peaks(tokens, traffic, topo)
    _, traffic0, _ = plan_outcome(plan_relibra(counts, dataclasses.replace(topo, replica_slots=0), mode="replicate"), counts)
    nic0, _ = _layer_peaks(counts.sum(2), traffic0, topo)
    nodes = np.asarray(topo.node_of_rank)
    sent0 = (traffic0 * (nodes[:, None] != nodes[None, :])).sum(3)
    assert np.median(_inter_node_receive(traffic0, topo).max(-1) / sent0.max(-1)) > 1.2   # receive sets the time
    assert np.median(nic0) > 1.2
    assert np.median(nic) < 1.01 and nic.max() < 1.03
    assert np.median(pairs) < 1.01 and pairs.max() < 1.05


def test_plan_outcome_counts_the_gemm_calls_of_copies_with_pairs():
    # 2 ranks x 2 experts. Rank 0's expert 0 (600 pairs) sheds 300 to a replica on rank 1; expert 1 has
    # no pairs: rank 0 runs 1 GEMM call, rank 1 runs its expert 2, expert 3 and the replica: 3
    counts = np.zeros((1, 1, 2, 4), dtype=np.int64)
    counts[0, 0, 0, 0] = counts[0, 0, 1, 0] = 300
    counts[0, 0, :, 2] = 10
    counts[0, 0, :, 3] = 5
    topo = Topology(4, 2, 2, 1)
    rep = np.full((1, 1, 2, 1), -1)
    quota = np.zeros((1, 1, 2, 1, 2), dtype=np.int64)
    rep[0, 0, 1, 0] = 0
    quota[0, 0, 1, 0] = [0, 300]                      # rank 1's own pairs of expert 0
    plan = BatchPlan(topo, identity_placement(topo, 1), rep, quota, np.zeros(1, np.int64))
    validate_plan(plan, counts)
    tokens, _, calls = plan_outcome(plan, counts)
    assert tokens[0, 0].tolist() == [300, 330] and calls[0, 0].tolist() == [1, 3]
    # the whole of expert 0 on the replica: its home copy runs no GEMM
    counts[0, 0, 0, 0] = 0
    assert plan_outcome(plan, counts)[2][0, 0].tolist() == [0, 3]


def test_nodes_that_do_not_set_the_layers_time_get_no_replicas():
    # identity placement, one taste: the node holding the hottest expert sets each layer's time; a node
    # already below the layer's final peaks (pairs and inter-node receive) gains nothing from a replica
    rng = np.random.default_rng(0)
    G, g, E = 16, 4, 32
    topo = Topology(E, G, g, 2)
    popular = rng.permutation(1.0 / np.arange(1, E + 1) ** 0.8)
    counts = rng.multinomial(4096, popular / popular.sum(), size=(3, 2, G))
    plan = plan_relibra(counts, topo, mode="replicate")
    tokens, traffic, _ = plan_outcome(plan, counts)
    tokens0, traffic0, _ = plan_outcome(plan_relibra(counts, dataclasses.replace(topo, replica_slots=0),
                                                     mode="replicate"), counts)
    by_node = lambda x: x.reshape(3, 2, G // g, g)
    ib, ib0 = by_node(_inter_node_receive(traffic, topo)), by_node(_inter_node_receive(traffic0, topo))
    idle = (by_node(tokens0).max(-1) <= tokens.max(-1)[..., None]) & (ib0.max(-1) <= ib.max(-1).max(-1)[..., None])
    replicas = by_node((plan.replica_expert >= 0).sum(-1)).sum(-1)        # [M, L, N]
    assert idle.sum() >= 6 and (replicas[idle] == 0).all()
    assert replicas[~idle].sum() > 0


def test_min_replica_tokens_and_owner_cap():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 40, size=(2, 4, 8, 32))
    counts[..., 0] += 300
    topo = Topology(32, 8, 8, 3)
    free = plan_relibra(counts, topo, mode="replicate")
    q = free.replica_quota.sum(-1)
    assert q[free.replica_expert >= 0].min() < 200
    strict = plan_relibra(counts, topo, mode="replicate", replication=ReplicationConfig(min_replica_tokens=200))
    assert strict.replica_quota.sum(-1)[strict.replica_expert >= 0].min() >= 200
    capped = plan_relibra(counts, topo, mode="replicate", replication=ReplicationConfig(max_copies_per_owner=1))
    home_rank = capped.home_of_expert() // topo.S
    m, l, r, k = np.nonzero(capped.replica_expert >= 0)
    owners = home_rank[l, capped.replica_expert[m, l, r, k]]
    _, per_owner = np.unique(np.stack([m, l, owners]), axis=1, return_counts=True)
    assert per_owner.max() == 1


def test_reorder_balances_nodes_and_prefers_few_moves():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 20, size=(4, 6, 16, 64))
    counts[:, :, :, :8] += 200                          # experts 0-7 are hot and all homed on node 0
    topo = Topology(64, 16, 8, 0)
    plan = plan_relibra(counts, topo, mode="reorder")
    validate_plan(plan, counts)
    before = run_strategy("megatron", counts, topo).imbalance()
    after = run_strategy("relibra-reorder", counts, topo).imbalance()
    assert after.mean() < before.mean() - 0.2
    again = plan_relibra(counts, topo, plan.expert_at_home, mode="reorder")
    assert again.moved_experts.sum() == 0              # the same loads need no further moves


def test_copy_tables_follow_the_plan():
    counts = np.zeros((1, 1, 4, 8), dtype=np.int64)
    counts[0, 0, :, 1] = [30, 30, 30, 30]
    topo = Topology(8, 4, 4, 2)
    plan = plan_relibra(counts, topo, mode="replicate")
    for src in range(4):
        slots, quota = plan.copy_tables(0, 0, src)
        assert slots[1, 0] == 1                          # home of expert 1: rank 0, slot 1 of (S+R) = 4
        assert quota[1, 0] == 0 and quota[1].sum() <= 30
        assert (slots[quota > 0] >= 0).all()
        assert np.array_equal(slots[:, 0], [0, 1, 4, 5, 8, 9, 12, 13])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=10, ep_size=4, gpus_per_node=2), "not divisible by the EP size"),
    (dict(num_experts=8, ep_size=6, gpus_per_node=4), "not divisible by the EP size"),
    (dict(num_experts=12, ep_size=6, gpus_per_node=4), "not a multiple of gpus_per_node"),
    (dict(num_experts=8, ep_size=0, gpus_per_node=1), "G >= 1"),
])
def test_bad_topologies(kwargs, message):
    with pytest.raises(PlanError, match=message):
        Topology(**kwargs)


def test_bad_counts_and_plans_are_named():
    topo = Topology(8, 4, 2, 1)
    with pytest.raises(PlanError, match="counts are for G=2, E=8"):
        plan_relibra(np.zeros((1, 1, 2, 8)), topo)
    with pytest.raises(PlanError, match="must be \\[micro_batches"):
        plan_relibra(np.zeros((1, 4, 8)), topo)
    counts = np.random.default_rng(0).integers(0, 100, size=(1, 2, 4, 8))
    counts[..., 0] += 900
    plan = plan_relibra(counts, topo)
    m, l, r, k = [int(x[0]) for x in np.nonzero(plan.replica_expert >= 0)]
    e = int(plan.replica_expert[m, l, r, k])
    off_node = dataclasses.replace(plan, replica_expert=plan.replica_expert.copy())
    other = [x for x in range(4) if topo.node_of_rank[x] != topo.node_of_rank[r]][0]
    off_node.replica_expert[m, l, other, 0] = e
    off_node.replica_expert[m, l, r, k] = -1
    with pytest.raises(PlanError, match="invariant 2 violated: replica of expert"):
        validate_plan(off_node, counts)
    greedy = dataclasses.replace(plan, replica_quota=plan.replica_quota * 5)
    with pytest.raises(PlanError, match="invariant 1 violated"):
        validate_plan(greedy, counts)
    broken = dataclasses.replace(plan, expert_at_home=np.zeros_like(plan.expert_at_home))
    with pytest.raises(PlanError, match="invariant 2 violated: placement of layer 0"):
        validate_plan(broken, counts)
    flaky = iter([plan, dataclasses.replace(plan, replica_quota=plan.replica_quota + 1)])
    with pytest.raises(PlanError, match="invariant 3 violated"):
        check_deterministic(lambda: next(flaky))


def test_degenerate_topologies():
    counts = np.random.default_rng(0).integers(0, 50, size=(2, 2, 1, 4))
    for name in STRATEGIES:                              # G = 1: nothing to balance, nothing breaks
        res = run_strategy(name, counts, Topology(4, 1, 1, 2))
        assert np.allclose(res.imbalance(), 1.0)
    plan = plan_relibra(np.zeros((2, 2, 4, 8), dtype=np.int64), Topology(8, 4, 4, 0))
    assert (plan.replica_expert == -1).all() and plan.replica_expert.shape[-1] == 0


def test_interleaved_node_layout_keeps_invariants():
    # ranks 0, 2, 4, 6 on node 0 and 1, 3, 5, 7 on node 1: never assume node = rank // g
    topo = Topology(16, 8, 4, 2, node_of_rank=(0, 1, 0, 1, 0, 1, 0, 1))
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 30, size=(3, 2, 8, 16))
    counts[..., 2] += 400
    counts[..., 9] += 250
    for mode in ("replicate", "both"):
        plan = plan_relibra(counts, topo, mode=mode)
        validate_plan(plan, counts)
        assert (plan.replica_expert >= 0).any()
        tokens, traffic, _ = plan_outcome(plan, counts)
        np.testing.assert_allclose(tokens.sum(-1), counts.sum((2, 3)))
        assert (traffic >= 0).all()
        assert run_strategy("relibra" if mode == "both" else "relibra-replicate", counts, topo).imbalance().mean() < \
            run_strategy("megatron", counts, topo).imbalance().mean()


def test_swap_refinement_never_worsens_node_balance():
    from relibra_verl.planner.reorder import _pack_vectors, _refine_by_swaps
    rng = np.random.default_rng(11)
    load = rng.gamma(0.5, 100.0, size=(6, 32, 5))                       # [L, E, M], skewed
    start = _pack_vectors(load, 4)

    def sq_dev(node_of):
        node_load = np.einsum("len,lem->lnm", node_of[..., None] == np.arange(4), load)
        return ((node_load - node_load.mean(1, keepdims=True)) ** 2).sum((1, 2))

    steps = _refine_by_swaps(load, start, 4, every_step=True)
    assert np.array_equal(steps[0], start)
    costs = np.stack([sq_dev(s) for s in steps])                          # [steps + 1, L]
    assert (np.diff(costs, axis=0) <= 1e-6).all()                        # every step lowers or keeps it
    assert (costs[-1] < costs[0]).any()
    for s in steps:                                                       # every node keeps E / N experts
        assert (np.stack([np.bincount(row, minlength=4) for row in s]) == 8).all()


def test_prohibitive_move_cost_keeps_the_placement():
    from relibra_verl.planner.relibra import ReorderConfig
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 20, size=(3, 4, 16, 64))
    counts[:, :, :, :8] += 300                                            # hot experts all on node 0
    topo = Topology(64, 16, 8, 2)
    free = plan_relibra(counts, topo, mode="reorder", reorder=ReorderConfig(move_cost_pairs=1e-9))
    dear = plan_relibra(counts, topo, mode="reorder", reorder=ReorderConfig(move_cost_pairs=1e12))
    nodes = np.asarray(topo.node_of_rank)
    cross = lambda p: (nodes[p.home_of_expert() // topo.S] != nodes[np.arange(64) // topo.S]).sum()
    assert cross(free) > 0 and cross(dear) == 0


def test_rank_move_cost_keeps_ranks_and_spreads_arrivals():
    from relibra_verl.planner.relibra import ReorderConfig
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 20, size=(3, 4, 8, 32))
    counts[:, :, :, :4] += 300                                            # hot experts all on rank 0
    topo = Topology(32, 8, 8, 2)                                          # one node: every move is inside it
    free = plan_relibra(counts, topo, mode="reorder", reorder=ReorderConfig(rank_move_cost_pairs=1e-9))
    dear = plan_relibra(counts, topo, mode="reorder", reorder=ReorderConfig(rank_move_cost_pairs=1e12))
    assert free.moved_experts.sum() > 0 and dear.moved_experts.sum() == 0


def test_rank_cost_by_hand():
    from relibra_verl.planner.reorder import _rank_cost
    # one (layer, node) problem: 4 experts on 2 ranks, one micro-batch; experts 2, 3 arrive from another node
    load = np.array([[[10.0], [10.0], [5.0], [5.0]]])                     # [P=1, n=4, M=1]
    old_pos = np.array([[0, 1, -1, -1]])
    cand = np.array([[[0, 1, 0, 1]],                                      # arrivals spread, nobody moves
                     [[0, 1, 1, 0]],                                      # the same loads, spread
                     [[1, 0, 0, 1]],                                      # both old experts swap ranks
                     [[0, 0, 1, 1]]])                                     # one old expert moves, arrivals together
    cost = _rank_cost(cand, load, old_pos, 2, move_cost=7.0, arrival_cost=3.0)[:, 0]
    # busiest rank 15 for the first three, 20 for the last; busiest receiver: 1 arrival (3), 1 arrival + 1
    # move (max(7, 3) = 7), 2 arrivals and no move on rank 1 (6) vs 1 move on rank 0 (7)
    assert cost.tolist() == [15 + 3, 15 + 3, 15 + 7, 20 + 7]


def test_inter_node_loads_match_a_direct_count():
    from relibra_verl.planner.reorder import _InterNodeLoads
    rng = np.random.default_rng(3)
    for topo in (Topology(16, 8, 2, 1), Topology(16, 8, 4, 1, node_of_rank=(0, 1, 0, 1, 1, 0, 1, 0))):
        counts = rng.integers(0, 50, size=(2, 3, 8, 16))                 # [M, L, G, E]
        node_of = np.stack([np.stack([rng.permutation(np.repeat(np.arange(topo.num_nodes), 16 // topo.num_nodes))
                                      for _ in range(3)]) for _ in range(2)])   # [C, L, E]
        sent, recv, load = _InterNodeLoads(counts, topo)(node_of)
        nodes = np.asarray(topo.node_of_rank)
        for c in range(2):
            for l in range(3):
                for m in range(2):
                    for s in range(8):
                        assert sent[c, l, m, s] == counts[m, l, s, node_of[c, l] != nodes[s]].sum()
                    for n in range(topo.num_nodes):
                        mine = node_of[c, l] == n
                        assert load[c, l, m, n] == counts[m, l][:, mine].sum()
                        assert recv[c, l, m, n] == counts[m, l][nodes != n][:, mine].sum()


def test_inter_node_share_lets_a_busy_rank_keep_its_tokens_on_its_node():
    # rank 0 (node 0) holds 4x the tokens of any other rank, all for experts 8..11 that Megatron's layout
    # puts on node 1: without the send side in view the node balance is already perfect and nothing moves
    from relibra_verl.planner.reorder import ReorderConfig, _InterNodeLoads
    topo = Topology(16, 4, 2, 1)
    counts = np.full((2, 1, 4, 16), 10, dtype=np.int64)
    counts[:, :, 0, 8:12] += 60
    counts[:, :, 1:, 0:4] += 20                                           # node 0's experts stay as busy
    plain = plan_relibra(counts, topo, mode="reorder", reorder=ReorderConfig(move_cost_pairs=1.0))
    aware = plan_relibra(counts, topo, mode="reorder", reorder=ReorderConfig(move_cost_pairs=1.0, inter_node_share=0.9))
    node_of = lambda p: np.asarray(topo.node_of_rank)[p.home_of_expert() // topo.S]
    sent = lambda p: _InterNodeLoads(counts, topo)(node_of(p)[None])[0][0]   # [L, M, G]
    assert sent(aware).max() < 0.8 * sent(plain).max()
    validate_plan(aware, counts)
