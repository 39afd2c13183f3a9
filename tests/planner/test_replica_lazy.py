"""plan_replicas spends its greedy runs on the node that sets each layer's time (replicate._plan_layers);
every node with both runs in full (_thorough=True) is the reference it must stay with."""
from __future__ import annotations

import numpy as np
import pytest

from relibra_verl.commands.bench_planner import PLANNER_SHAPES, synthetic_counts
from relibra_verl.planner import (ReplicationConfig, Topology, identity_placement, load_profile, plan_replicas,
                                  planner_configs, validate_plan)
from relibra_verl.planner.types import BatchPlan
from relibra_verl.sim.presets import get_preset

# (experts, EP, GPUs per node): 2, 4 and 8 nodes, and one node (nothing to leave out there)
TOPOLOGIES = [(32, 16, 8), (64, 32, 8), (64, 32, 4), (32, 8, 8)]
CONFIGS = {
    "pairs": ReplicationConfig(),
    "time-aware": ReplicationConfig(min_replica_tokens=4, replica_overhead_pairs=40.0, inter_node_share=0.8,
                                    copy_cost_pairs=12.0),
}


def _routed(topo: Topology, seed: int, M: int = 4, L: int = 6) -> np.ndarray:
    """[M, L, G, E] skewed loads: a per-layer Zipf popularity with per-rank noise."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, topo.E + 1) ** 0.9
    counts = np.empty((M, L, topo.G, topo.E), dtype=np.int64)
    for l in range(L):
        p = rng.dirichlet(rng.permutation(base / base.sum()) * 100.0, size=(M, topo.G))
        counts[:, l] = rng.multinomial(600, p / p.sum(-1, keepdims=True))
    return counts


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("shape", TOPOLOGIES, ids=lambda s: "E%d-ep%d-g%d" % s)
def test_layers_end_where_every_node_with_both_runs_in_full_ends(shape, config):
    E, ep, gpn = shape
    topo = Topology(E, ep, gpn, replica_slots=2)
    replication = CONFIGS[config]
    differ, total, fast_sum, full_sum = 0, 0, 0.0, 0.0
    for seed in range(3):
        counts = _routed(topo, seed)
        placement = identity_placement(topo, counts.shape[1])
        rep_e, rep_q, fast = plan_replicas(counts, topo, placement, replication)
        _, _, full = plan_replicas(counts, topo, placement, replication, _thorough=True)
        validate_plan(BatchPlan(topo, placement, rep_e, rep_q, np.zeros(counts.shape[1], dtype=np.int64)), counts)
        differ += int((np.abs(fast - full) > 1e-9 * full).sum())
        total += fast.size
        fast_sum, full_sum = fast_sum + float(fast.sum()), full_sum + float(full.sum())
    # the rare layer where a node cut to its shortest prefix ends above the node on top differs, by little
    assert differ <= 0.05 * total, (differ, total)
    assert abs(fast_sum - full_sum) <= 1e-4 * full_sum, (fast_sum, full_sum)


@pytest.mark.parametrize("preset,ep,gpn", [("deepseek-v2-lite", 16, 8), ("deepseek-v2-lite", 32, 4),
                                           ("qwen3-30b-a3b", 32, 8)])
def test_layers_stay_with_the_reference_at_a_models_shape(preset, ep, gpn):
    """Skewed loads of a model's shape, planned with the trainer's time-aware configuration."""
    L, E, K = PLANNER_SHAPES[preset]
    topo = Topology(E, ep, gpn, replica_slots=2)
    counts = synthetic_counts(L, E, K, ep, micro_batches=8, tokens_per_rank=4096, seed=3)
    replication, _ = planner_configs(get_preset(preset), load_profile("h100-ib400"), topo.num_nodes,
                                     topo.ranks_per_node)
    placement = identity_placement(topo, L)
    _, _, fast = plan_replicas(counts, topo, placement, replication)
    _, _, full = plan_replicas(counts, topo, placement, replication, _thorough=True)
    excess = fast / full - 1
    assert excess.max() <= 0.01, (excess.max(), np.unravel_index(excess.argmax(), excess.shape))
    assert abs(fast.sum() / full.sum() - 1) <= 1e-4, fast.sum() / full.sum()


def test_thorough_and_lazy_agree_on_one_node():
    """With one node there is no other node to leave out: the two are the same plan."""
    topo = Topology(32, 8, 8, replica_slots=2)
    counts = _routed(topo, 7)
    placement = identity_placement(topo, counts.shape[1])
    fast = plan_replicas(counts, topo, placement, CONFIGS["time-aware"])
    full = plan_replicas(counts, topo, placement, CONFIGS["time-aware"], _thorough=True)
    for a, b in zip(fast, full):
        np.testing.assert_array_equal(a, b)
