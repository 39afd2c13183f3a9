"""The planner's compiled helpers against plain numpy: the replication planner's slot loads (what each
home slot holds from other nodes and from its own node, and F, the most any rank sends off its node) and
the reorder's home slots."""
from __future__ import annotations

import numpy as np
import pytest

from relibra_verl.planner import Topology
from relibra_verl.planner.reorder import _fill_slots
from relibra_verl.planner.replicate import _home_nodes, _slot_loads


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("ep, gpus_per_node, experts", [(8, 4, 16), (16, 8, 64), (12, 4, 12)])
def test_slot_loads_match_numpy(ep, gpus_per_node, experts, dtype):
    topo = Topology(num_experts=experts, ep_size=ep, gpus_per_node=gpus_per_node)
    rng = np.random.default_rng(ep * experts)
    counts = rng.integers(0, 50, size=(ep, experts)).astype(dtype)
    placement = rng.permutation(experts)                                   # expert in each home slot
    node_ranks, node_of_rank = topo.node_ranks(), np.asarray(topo.node_of_rank, dtype=np.int64)
    N, g = node_ranks.shape
    S = topo.S
    on_node = np.zeros((N, experts), dtype=np.int64)
    _home_nodes(placement, S, node_of_rank, on_node)
    home_r = np.zeros((N, g, S), dtype=np.int64)
    home_l = np.zeros((N, g, S), dtype=np.int64)
    floor = _slot_loads(counts, placement, on_node, node_ranks, node_of_rank, S, np.zeros((N, experts), dtype=np.int64),
                        home_r, home_l)
    # numpy: the node of each expert's home, then per source whether it shares it
    home_node = np.empty(experts, dtype=np.int64)
    home_node[placement] = node_of_rank[np.arange(experts) // S]
    same = node_of_rank[:, None] == home_node[None, :]                     # [G, E]
    local, remote = (counts * same).sum(0), (counts * ~same).sum(0)
    assert floor == (counts * ~same).sum(1).max()
    for n in range(N):
        for i, rank in enumerate(node_ranks[n]):
            experts_here = placement[rank * S:(rank + 1) * S]
            assert np.array_equal(home_r[n, i], remote[experts_here])
            assert np.array_equal(home_l[n, i], local[experts_here])
    assert np.array_equal(on_node.argmax(0), home_node) and (on_node.sum(0) == 1).all()


@pytest.mark.parametrize("seed", range(20))
def test_home_slots_keep_unmoved_experts_and_fill_each_rank_in_order(seed):
    rng = np.random.default_rng(seed)
    S, G, L = int(rng.integers(1, 5)), int(rng.integers(1, 9)), 3
    E = S * G
    prev = np.stack([rng.permutation(E) for _ in range(L)])                # expert in each slot
    prev_home = np.argsort(prev, axis=1)                                   # slot of each expert
    rank_of = np.stack([rng.permutation(np.repeat(np.arange(G), S)) for _ in range(L)])
    out = _fill_slots(rank_of, prev, prev_home, S)
    for l in range(L):
        expected = np.full(E, -1)
        stays = rank_of[l] == prev_home[l] // S
        expected[prev_home[l, stays]] = np.flatnonzero(stays)
        movers = np.flatnonzero(~stays)
        expected[expected < 0] = movers[np.lexsort((movers, rank_of[l, movers]))]
        assert np.array_equal(out[l], expected)
        assert np.array_equal(np.sort(out[l]), np.arange(E)) and (np.argsort(out[l]) // S == rank_of[l]).all()
