"""The reorder's preferred nodes (plan_placement / plan_relibra `preferred_node`): the expert -> node hint of
the co-placement planner. Followed where balance is indifferent, never at the cost of balance, and plans
without a hint unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from relibra_verl.planner import ReorderConfig, Topology, plan_relibra
from relibra_verl.planner.reorder import _placement_cost, plan_placement
from relibra_verl.planner.types import PlanError, identity_placement, invert_placement

TOPO = Topology(num_experts=16, ep_size=4, gpus_per_node=2, replica_slots=0)
TIME_AWARE = ReorderConfig(move_cost_pairs=40.0, rank_move_cost_pairs=5.0, inter_node_share=0.8)


def _hint(seed, L=2, E=16, N=2):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.repeat(np.arange(N), E // N)) for _ in range(L)])


def _node_of(placement, topo=TOPO):
    return np.asarray(topo.node_of_rank)[invert_placement(placement) // topo.S]


def _counts(seed, M=3, L=2, skew=0.0):
    rng = np.random.default_rng(seed)
    weight = np.exp(skew * rng.standard_normal((L, 16)))
    return rng.poisson(200 * weight[None, :, None, :], size=(M, L, 4, 16)).astype(np.int64)


@pytest.mark.parametrize("config", [ReorderConfig(), TIME_AWARE], ids=["pairs", "time-aware"])
def test_equal_loads_follow_the_hint(config):
    """Every expert equally loaded in every micro-batch: every balanced split is as good, the hint decides."""
    counts = np.full((2, 2, 4, 16), 10, dtype=np.int64)
    hint = _hint(1)
    without = plan_placement(counts, TOPO, None, config)
    placement = plan_placement(counts, TOPO, None, config, preferred_node=hint)
    assert (_node_of(placement) == hint).all()
    assert (_node_of(without) != hint).any()                              # the hint changed the placement
    assert np.allclose(_placement_cost(counts.sum(2).transpose(1, 2, 0).astype(float), placement, TOPO), 0)


@pytest.mark.parametrize("config", [ReorderConfig(), TIME_AWARE], ids=["pairs", "time-aware"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_hint_never_costs_balance(config, seed):
    """A hint that puts the 8 heaviest experts of each layer on one node is not followed there: the busiest
    node of every micro-batch carries at most 2 % more than without the hint."""
    counts = _counts(seed, skew=1.0)
    load = counts.sum(2)                                                  # [M, L, E]
    heavy = np.argsort(-load.sum(0), axis=1)[:, :8]
    hint = np.ones((2, 16), np.int64)
    np.put_along_axis(hint, heavy, 0, axis=1)
    busiest = []
    for h in (None, hint):
        node = _node_of(plan_placement(counts, TOPO, None, config, preferred_node=h))
        per_node = np.stack([np.where(node[None] == n, load, 0).sum(-1) for n in range(2)])   # [N, M, L]
        busiest.append(per_node.max(0))
    assert (busiest[1] <= busiest[0] * 1.02).all()
    heavy_on_0 = np.take_along_axis(node, heavy, axis=1) == 0
    assert heavy_on_0.mean() < 0.75


@pytest.mark.parametrize("config", [ReorderConfig(), TIME_AWARE], ids=["pairs", "time-aware"])
def test_a_hint_moves_the_placement_towards_it(config):
    """Mildly skewed loads: with move costs (time-aware) most experts end on their hinted node, far more
    than without the hint; counting pairs only, the hint breaks ties of balance alone (never fewer)."""
    agree = []
    for seed in range(4):
        counts, hint = _counts(seed, skew=0.3), _hint(seed + 10)
        for h in (None, hint):
            agree.append((_node_of(plan_placement(counts, TOPO, None, config, preferred_node=h)) == hint).mean())
    without, with_hint = np.array(agree[0::2]), np.array(agree[1::2])
    assert (with_hint >= without).all() and with_hint.mean() > without.mean()
    if config.move_cost_pairs > 0:
        assert (with_hint > without).all() and with_hint.mean() > 0.8


def test_plan_relibra_passes_the_hint_and_weighs_the_real_migration():
    """plan_relibra: without a hint the plan is the one plan_placement makes without; with a hint and an
    enormous migration cost the placement in force is kept (the move to the hinted nodes is weighed with
    the real migration from it)."""
    counts = np.full((2, 2, 4, 16), 10, dtype=np.int64)
    hint = _hint(3)
    plain = plan_relibra(counts, TOPO, None, mode="reorder", reorder=TIME_AWARE)
    assert (plain.expert_at_home == plan_placement(counts, TOPO, None, TIME_AWARE)).all()
    hinted = plan_relibra(counts, TOPO, None, mode="reorder", reorder=TIME_AWARE, preferred_node=hint)
    assert (_node_of(hinted.expert_at_home) == hint).all()
    costly = ReorderConfig(move_cost_pairs=40.0, inter_node_share=0.8, migration_pairs=(1e9, 1e9))
    kept = plan_relibra(counts, TOPO, None, mode="reorder", reorder=costly, preferred_node=hint)
    assert (kept.expert_at_home == identity_placement(TOPO, 2)).all()


def test_bad_hints_are_named():
    counts = np.full((1, 2, 4, 16), 1, dtype=np.int64)
    with pytest.raises(PlanError, match="preferred_node"):
        plan_placement(counts, TOPO, None, preferred_node=np.zeros((2, 15), np.int64))
    with pytest.raises(PlanError, match="8 experts on each of 2 nodes"):
        plan_placement(counts, TOPO, None, preferred_node=np.zeros((2, 16), np.int64))
    # eight experts per node over the batch, but not in either layer
    with pytest.raises(PlanError, match="8 experts on each of 2 nodes in every layer"):
        plan_placement(counts, TOPO, None, preferred_node=np.repeat([[0], [1]], 16, axis=1))
    with pytest.raises(PlanError, match=r"node ids outside \[0, 2\)"):
        plan_placement(counts, TOPO, None, preferred_node=np.tile(np.repeat([0, 2], 8), (2, 1)))
