"""plan_relibra weighs the new placement (with its replicas and migration) against keeping the placement in force
(with its replicas), and keeps the better: under the planner's cost and in the simulator's step time."""
from __future__ import annotations

import json

import numpy as np
import pytest

from relibra_verl.cli import main
from relibra_verl.planner import (PlanError, ReorderConfig, ReplicationConfig, Topology, identity_placement, plan_placement,
                                  plan_relibra, plan_replicas, validate_plan)
from relibra_verl.planner.relibra import migration_cost

TOPO = Topology(num_experts=16, ep_size=8, gpus_per_node=4, replica_slots=2)
REPLICATION = ReplicationConfig(replica_overhead_pairs=20.0, inter_node_share=0.5, copy_cost_pairs=5.0)


def _skewed(seed: int, M: int = 3, L: int = 4) -> np.ndarray:
    """[M, L, G, E] loads whose hot experts sit together on node 0 under Megatron's placement."""
    rng = np.random.default_rng(seed)
    pop = np.r_[np.full(8, 6.0), np.ones(8)] * rng.uniform(0.5, 1.5, 16)
    return rng.poisson(pop * 20, size=(M, L, TOPO.G, TOPO.E)).astype(np.int64)


def _planner_cost(counts, placement, prev, reorder) -> float:
    """The planner's cost of a placement per batch: J with its replicas summed over the batch, plus its
    migration spread over the horizon's batches."""
    return (float(plan_replicas(counts, TOPO, placement, REPLICATION)[2].sum())
            + migration_cost(prev, placement, TOPO, reorder) / reorder.migration_horizon)


@pytest.mark.parametrize("horizon", [1.0, 2.0])
@pytest.mark.parametrize("migration", [(0.0, 0.0), (40.0, 10.0), (400.0, 100.0), (1e6, 1e6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_is_never_worse_than_keeping_or_moving_under_the_planners_cost(seed, migration, horizon):
    counts = _skewed(seed)
    prev = identity_placement(TOPO, counts.shape[1])
    reorder = ReorderConfig(migration_pairs=migration, migration_horizon=horizon)
    plan = plan_relibra(counts, TOPO, prev, replication=REPLICATION, reorder=reorder)
    validate_plan(plan, counts)
    new = plan_placement(counts, TOPO, prev, reorder)
    assert (new != prev).any(), "the skewed loads must make the reorder move experts"
    chosen = _planner_cost(counts, plan.expert_at_home, prev, reorder)
    assert chosen <= _planner_cost(counts, prev, prev, reorder) + 1e-6
    assert chosen <= _planner_cost(counts, new, prev, reorder) + 1e-6


def test_migration_that_dominates_keeps_the_placement_and_its_replicas():
    counts = _skewed(0, M=1)
    prev = identity_placement(TOPO, counts.shape[1])
    free = plan_relibra(counts, TOPO, prev, replication=REPLICATION, reorder=ReorderConfig())
    assert (free.expert_at_home != prev).any() and free.moved_experts.sum() > 0
    dear = plan_relibra(counts, TOPO, prev, replication=REPLICATION, reorder=ReorderConfig(migration_pairs=(1e6, 1e6)))
    assert (dear.expert_at_home == prev).all() and dear.moved_experts.sum() == 0
    replicate_only = plan_relibra(counts, TOPO, prev, mode="replicate", replication=REPLICATION)
    assert dear.digest() == replicate_only.digest()
    # the reorder alone (no replicas) is weighed the same way
    alone = plan_relibra(counts, TOPO, prev, mode="reorder", reorder=ReorderConfig(migration_pairs=(1e6, 1e6)))
    assert (alone.expert_at_home == prev).all() and (alone.replica_expert < 0).all()


def test_the_horizon_counts_the_gain_over_several_batches_against_one_migration():
    """A migration between one and two batches' gain: the batch alone keeps the placement, a two-batch
    horizon moves (each choice the cheaper one under its own weighing)."""
    counts = _skewed(0, M=1)
    prev = identity_placement(TOPO, counts.shape[1])
    new = plan_placement(counts, TOPO, prev, ReorderConfig())
    gain = float(plan_replicas(counts, TOPO, prev, REPLICATION)[2].sum() - plan_replicas(counts, TOPO, new, REPLICATION)[2].sum())
    assert gain > 0
    unit = migration_cost(prev, new, TOPO, ReorderConfig(migration_pairs=(1.0, 1.0)))   # busiest receiver's arrivals
    per_move = 1.5 * gain / unit                                            # the migration costs 1.5 batches' gain
    plans = {h: plan_relibra(counts, TOPO, prev, replication=REPLICATION,
                             reorder=ReorderConfig(migration_pairs=(per_move, per_move), migration_horizon=h))
             for h in (1.0, 2.0)}
    assert (plans[1.0].expert_at_home == prev).all()
    assert np.array_equal(plans[2.0].expert_at_home, new)
    with pytest.raises(PlanError, match="migration_horizon"):
        plan_relibra(counts, TOPO, prev, reorder=ReorderConfig(migration_horizon=0.0))


def test_small_real_batch_where_migration_dominates_relibra_is_not_worse_than_replication_alone(tmp_path):
    """Two real traces, EP 16 on 2 nodes, one micro-batch of 2048 tokens per rank: the reorder's migration is
    not repaid within one micro-batch. relibra keeps the placement and matches relibra-replicate's step time."""
    js = tmp_path / "r.json"
    assert main(["simulate", "--trace", "bundled:esft_intent", "--trace", "bundled:esft_law", "--model",
                 "deepseek-v2-lite", "--profile", "h100-ib400", "--resample", "32", "--steps", "1", "--ep", "16",
                 "--gpus-per-node", "8", "--tokens-per-rank", "2048", "--replica-slots", "2", "--no-progress",
                 "--strategies", "relibra-reorder,relibra-replicate,relibra", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["config"]["micro_batches_per_step"] == [1]
    s = r["strategies"]
    assert s["relibra"]["moved_experts_per_step"] == 0
    reorder_alone = s["relibra-reorder"]["step_time_s"]
    assert s["relibra"]["step_time_s"] <= s["relibra-replicate"]["step_time_s"] * (1 + 1e-3)
    assert s["relibra"]["step_time_s"] <= reorder_alone * (1 + 1e-3)


def test_migration_cost_is_the_busiest_receiver_over_its_link():
    topo = Topology(num_experts=4, ep_size=4, gpus_per_node=2)
    cfg = ReorderConfig(migration_pairs=(10.0, 1.0))
    prev = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    assert migration_cost(prev, prev, topo, cfg) == 0.0
    # layer 0: experts 0 and 1 trade ranks inside node 0 (NVLink); layer 1: 0 and 2 trade nodes (InfiniBand)
    assert migration_cost(prev, np.array([[1, 0, 2, 3], [0, 1, 2, 3]]), topo, cfg) == 1.0
    assert migration_cost(prev, np.array([[1, 0, 2, 3], [2, 1, 0, 3]]), topo, cfg) == 10.0
    # all layers move at once: rank 0 receives twice over NVLink
    assert migration_cost(prev, np.array([[1, 0, 2, 3], [1, 0, 2, 3]]), topo, cfg) == 2.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replica_lower_bound_never_exceeds_the_planned_critical_path(seed):
    from relibra_verl.planner.replicate import replica_lower_bound

    counts = _skewed(seed)
    rng = np.random.default_rng(seed)
    placement = np.stack([rng.permutation(TOPO.E) for _ in range(counts.shape[1])])
    j = plan_replicas(counts, TOPO, placement, REPLICATION)[2]
    bound = replica_lower_bound(counts, TOPO, placement, REPLICATION)
    assert bound.shape == j.shape and (bound <= j + 1e-9).all() and (bound > 0).all()
    # a subset of layers reads the same rows
    assert np.array_equal(replica_lower_bound(counts, TOPO, placement[[2, 0]], REPLICATION, layers=np.array([2, 0])),
                          bound[:, [2, 0]])


@pytest.mark.parametrize("migration", [(0.0, 0.0), (400.0, 100.0), (1e6, 1e6)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_placement_alone_is_the_one_the_full_plan_chooses(seed, migration):
    """with_replicas=False (the trainer's next placement) chooses the placement the full plan chooses (moving,
    keeping, or moving some layers), and plan_replicas without quotas gives the same J."""
    counts = _skewed(seed)
    prev = identity_placement(TOPO, counts.shape[1])
    if seed == 2:                                        # a placement in force that differs from Megatron's
        prev = plan_placement(_skewed(7), TOPO, prev, ReorderConfig())
    reorder = ReorderConfig(migration_pairs=migration)
    full = plan_relibra(counts, TOPO, prev, replication=REPLICATION, reorder=reorder)
    alone = plan_relibra(counts, TOPO, prev, replication=REPLICATION, reorder=reorder, with_replicas=False)
    np.testing.assert_array_equal(alone.expert_at_home, full.expert_at_home)
    np.testing.assert_array_equal(alone.moved_experts, full.moved_experts)
    assert (alone.replica_expert == -1).all() and not alone.replica_quota.any()
    assert alone.replica_quota.shape == full.replica_quota.shape and (full.replica_expert >= 0).any()
    e, q, j = plan_replicas(counts, TOPO, full.expert_at_home, REPLICATION, quotas=False)
    np.testing.assert_array_equal(j, plan_replicas(counts, TOPO, full.expert_at_home, REPLICATION)[2])
    assert (e == -1).all() and not q.any()
