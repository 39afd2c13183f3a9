"""The reorder's compiled kernels (planner/reorder_kernels.py) against its numpy reference (reorder.py's
_cheapest_assignment and the steps around it): the same placements, bit for bit, on integer loads."""
import numpy as np
import pytest

from relibra_verl.planner import reorder, reorder_kernels
from relibra_verl.planner.reorder import ReorderConfig
from relibra_verl.planner.types import Topology, identity_placement

TOPOLOGIES = [
    Topology(64, 16, 8, 2),                                               # 2 nodes x 8, S = 4
    Topology(32, 32, 8, 1),                                               # 4 nodes x 8, S = 1
    Topology(48, 12, 4, 1),                                               # 3 nodes x 4: no power of two
    Topology(32, 8, 8, 2),                                                # one node: ranks only
    Topology(32, 8, 1, 1),                                                # 8 nodes of one rank: nodes only
    Topology(32, 8, 4, 1, node_of_rank=(0, 1, 0, 1, 1, 0, 1, 0)),         # ranks of a node not contiguous
]
CONFIGS = [
    ReorderConfig(),                                                      # balance only
    ReorderConfig(node_stickiness=0.05, rank_stickiness=0.02),
    ReorderConfig(move_cost_pairs=300.0, rank_move_cost_pairs=40.0),      # as planner_configs derives them
    ReorderConfig(move_cost_pairs=1e-9, rank_move_cost_pairs=1e-9, node_stickiness=0.2),
    ReorderConfig(move_cost_pairs=300.0, rank_move_cost_pairs=40.0, inter_node_share=0.8),
    ReorderConfig(move_cost_pairs=50.0, max_moves_per_layer=48, keep_tolerance=0.0),
]


def _counts(rng, M, L, G, E, dtype):
    """Skewed integer loads [M, L, G, E]: a few hot experts per layer, different in each micro-batch."""
    hot = rng.gamma(0.4, 1.0, size=(M, L, 1, E)) * rng.gamma(2.0, 1.0, size=(M, L, G, 1))
    return rng.poisson(40 * hot).astype(dtype)


@pytest.mark.parametrize("topo", TOPOLOGIES, ids=lambda t: f"E{t.E}-G{t.G}-g{t.ranks_per_node}")
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_compiled_placement_equals_the_numpy_reference(topo, config):
    config = CONFIGS[config]
    rng = np.random.default_rng(topo.E * 7 + topo.G)
    moved = 0
    for trial, dtype in enumerate((np.int64, np.int32, np.int64)):
        counts = _counts(rng, 3 + trial, 4, topo.G, topo.E, dtype)
        prev = identity_placement(topo, 4) if trial == 0 else np.stack([rng.permutation(topo.E) for _ in range(4)])
        fast = reorder._plan_placement(counts, topo, prev, config, None, None, compiled=True)
        slow = reorder._plan_placement(counts, topo, prev, config, None, None, compiled=False)
        np.testing.assert_array_equal(fast, slow)
        assert np.array_equal(np.sort(fast, axis=1), np.tile(np.arange(topo.E), (4, 1)))
        moved += int((fast != prev).sum())
    assert moved > 0                                                      # the cases are not all "keep"


@pytest.mark.parametrize("config", [0, 2, 4])
def test_compiled_placement_with_a_preferred_node_equals_the_reference(config):
    """plan_placement's preferred_node hint (a node per expert chosen with the data) through both paths."""
    topo, config = Topology(64, 16, 4, 2), CONFIGS[config]
    rng = np.random.default_rng(9)
    counts = _counts(rng, 4, 3, topo.G, topo.E, np.int64)
    preferred = np.stack([rng.permutation(np.repeat(np.arange(topo.num_nodes), topo.E // topo.num_nodes))
                          for _ in range(3)])
    fast = reorder._plan_placement(counts, topo, None, config, None, preferred, compiled=True)
    slow = reorder._plan_placement(counts, topo, None, config, None, preferred, compiled=False)
    np.testing.assert_array_equal(fast, slow)
    unhinted = reorder._plan_placement(counts, topo, None, config, None, None, compiled=True)
    assert not np.array_equal(fast, unhinted)                             # the hint changes the placement


@pytest.mark.parametrize("with_cost", [False, True])
@pytest.mark.parametrize("num_bins,n", [(4, 32), (8, 16), (3, 12), (8, 8), (2, 64)])
@pytest.mark.parametrize("few_values", [False, True], ids=["skewed", "ties"])
def test_assign_bins_equals_cheapest_assignment(num_bins, n, with_cost, few_values):
    """Both cost kinds, on problems whose previous assignment is partial (-1: the item is new); loads of a few
    distinct values make equal scores, overlaps and swap gains common (the first one must win)."""
    rng = np.random.default_rng(num_bins * 100 + n)
    P, M = 24, 5
    if few_values:
        load = rng.integers(0, 3, size=(P, n, M)).astype(float)
    else:
        load = rng.poisson(30 * rng.gamma(0.5, 1.0, size=(P, n, 1)) * rng.gamma(3.0, 1.0, size=(P, 1, M))).astype(float)
    prev = np.tile(np.repeat(np.arange(num_bins), n // num_bins), (P, 1))
    prev = np.stack([rng.permutation(row) for row in prev])
    prev[P // 2:][rng.random((P - P // 2, n)) < 0.3] = -1                 # half the problems: some items are new
    g = 2                                                                  # node cost: num_bins nodes of g ranks
    topo = Topology(num_bins * g, num_bins * g, g)
    node_cost = lambda cand: reorder._node_cost(cand, load, prev, ReorderConfig(move_cost_pairs=25.0), topo)
    rank_cost = lambda cand: reorder._rank_cost(cand, load, prev, num_bins, 25.0, 60.0)
    for kind, c, cost in ((reorder_kernels.NODE_COST, (g, 25.0, topo.G, 0.0), node_cost),
                          (reorder_kernels.RANK_COST, (25.0, 60.0), rank_cost)):
        for stickiness in (0.0, 0.05):
            fast = reorder._assign_compiled(load, num_bins, prev, stickiness, with_cost, kind, c)
            slow = reorder._cheapest_assignment(load, num_bins, prev, stickiness, cost if with_cost else None)
            np.testing.assert_array_equal(fast, slow)
            assert (np.stack([np.bincount(row, minlength=num_bins) for row in fast]) == n // num_bins).all()


def test_loads_and_placement_cost_match_numpy():
    rng = np.random.default_rng(2)
    topo = Topology(32, 8, 4, 1, node_of_rank=(1, 0, 1, 0, 0, 1, 0, 1))
    counts = rng.integers(0, 1000, size=(3, 5, 8, 32)).astype(np.int32)
    load = np.empty((5, 32, 3))
    reorder_kernels.expert_loads(counts, load)
    np.testing.assert_array_equal(load, counts.sum(2).transpose(1, 2, 0))
    placement = np.stack([rng.permutation(32) for _ in range(5)])
    np.testing.assert_allclose(reorder._placement_cost_compiled(load, placement, topo),
                               reorder._placement_cost(load, placement, topo), rtol=1e-12)
