"""The simulator's routing-aware data placement (strategy relibra-locality): for every batch, verl's split
of its sequences over the DP (= EP) ranks, the co-placement planner's (relibra_verl.planner.locality) from
it, and the loads of the co-placed split, cut into micro-batches as verl's dynamic batching does."""
from __future__ import annotations

import numpy as np

from relibra_verl.planner.locality import DataPlacement, LocalityConfig, node_of_expert_of, plan_locality, usage_from_routes
from relibra_verl.planner.types import Topology
from relibra_verl.routing.loads import count_loads, split_micro_batches
from relibra_verl.routing.trace import Trace


class LocalityPlacer:
    """place(step, prev_placement) -> (counts [M, L, G, E], node_of_expert [L, E] or None, DataPlacement)
    for the step's batch; prev_placement [L, E]: relibra-locality's placement in force (None: Megatron's)."""

    def __init__(self, batches: list[Trace], topo: Topology, tokens_per_rank: int,
                 config: LocalityConfig = LocalityConfig()):
        self.batches, self.topo, self.tokens_per_rank, self.config = batches, topo, tokens_per_rank, config

    def __call__(self, step: int, prev_placement: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, DataPlacement]:
        batch, topo = self.batches[step], self.topo
        lens = batch.seq_lens()
        verl_split = split_micro_batches(lens, topo.G, self.tokens_per_rank)
        verl_rank = np.empty(batch.num_seqs, dtype=np.int64)
        for per_rank in verl_split.seqs:
            for r, idx in enumerate(per_rank):
                verl_rank[idx] = r
        prev_nodes = None if prev_placement is None else node_of_expert_of(prev_placement, topo.node_of_rank, topo.S)
        usage = usage_from_routes(batch.expert_ids, batch.seq_offsets, batch.num_experts)
        placed = plan_locality(usage, lens, np.asarray(topo.node_of_rank), verl_rank, None, prev_nodes, self.config)
        split = verl_split if placed.fell_back else split_micro_batches(lens, topo.G, self.tokens_per_rank,
                                                                        rank_of_seq=placed.rank_of_seq)
        return count_loads(batch, split), placed.node_of_expert, placed
