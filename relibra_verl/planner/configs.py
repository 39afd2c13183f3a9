"""The planner's configuration from a hardware profile: time-aware planning inputs derived from the cost
model (relibra_verl.planner.hardware's per-pair GEMM coefficients) for the planner's `min_replica_tokens`,
`replica_overhead_pairs`, `copy_cost_pairs`, `inter_node_share`, `max_copies_per_owner`,
`move_cost_pairs` and `rank_move_cost_pairs`).

A routed pair costs the rank that computes it (1 + f) * b of expert time (f = bwd_compute_factor) and its
bytes in the 4 all-to-alls of the layer (dispatch and combine, forward and backward: 4 * H * act_bytes) on
the busier of its links: with a rank's pairs coming from every rank, (N - 1) / N of them cross InfiniBand
and (g - 1) / (N g) NVLink (`pair_seconds`). A replica moves `t` pairs off an overloaded rank and costs one
more GEMM call on its receiver ((1 + f) * a: the planner fills receivers to the mean, so the receiver ends
near the max) plus the exposed part of its weight copy (forward), re-copy (backward) and gradient reduce
(relibra_verl.sim.cost). It repays itself when

    t >= ((1 + f) * a + exposed_copy) / pair_seconds

Online (prefetch=False) the whole copy is exposed; with the plan known ahead only the contention share is
(the copy hides behind the window before the layer). With several nodes the all-to-all share dominates
(qwen3-30b-a3b, h100-ib400, 4 nodes: ~330 ns of InfiniBand vs ~35 ns of GEMM per pair), so a replica
that moves inter-node pairs repays itself sooner than one inside a single node.
"""
from __future__ import annotations

import dataclasses
import math

from relibra_verl.planner.hardware import HardwareProfile, expert_gemm_coeffs, non_moe_flops_per_token
from relibra_verl.planner.reorder import ReorderConfig
from relibra_verl.planner.replicate import ReplicationConfig


def replica_copy_seconds(model, profile: HardwareProfile) -> tuple[float, float]:
    """(weight copy, gradient reduce) seconds of one replica over NVLink."""
    p2p = profile.nvlink_p2p_GBps * 1e9
    return (model.expert_params * profile.weight_bytes_per_param / p2p,
            model.expert_params * profile.grad_bytes_per_param / p2p)


def exposed_copy_seconds(model, profile: HardwareProfile, *, prefetch: bool = True) -> float:
    """Critical-path seconds of one replica's copies: forward copy, backward re-copy and gradient reduce,
    all of them online, the contention share when sent ahead (relibra_verl.sim.cost)."""
    w, g = replica_copy_seconds(model, profile)
    return (2.0 * w + g) * (profile.replica_contention_share if prefetch else 1.0)


def _pair_costs(model, profile: HardwareProfile) -> tuple[float, float]:
    """(GEMM, InfiniBand) seconds of one routed pair: its expert compute forward and backward, and its bytes
    in the layer's 4 all-to-alls (dispatch and combine, forward and backward) at the inter-node rate."""
    _, b = expert_gemm_coeffs(model, profile)
    return (1.0 + profile.bwd_compute_factor) * b, 4.0 * model.hidden * profile.act_bytes / (profile.ib_a2a_GBps * 1e9)


def pair_seconds(model, profile: HardwareProfile, num_nodes: int = 1, gpus_per_node: int = 8) -> float:
    """Critical-path seconds one routed pair costs the rank that computes it: its expert GEMMs (forward
    and backward) and its bytes in the layer's 4 all-to-alls on the busier link, the rank's pairs coming
    evenly from all N * g ranks ((N-1)/N over InfiniBand, (g-1)/(N g) over NVLink)."""
    gemm, ib = _pair_costs(model, profile)
    N, g = max(1, num_nodes), max(1, gpus_per_node)
    nvl = 4.0 * model.hidden * profile.act_bytes / (profile.nvlink_a2a_GBps * 1e9)
    return gemm + max((N - 1) / N * ib, (g - 1) / (N * g) * nvl)


def min_replica_tokens(model, profile: HardwareProfile, *, prefetch: bool = True,
                       include_call: bool = True, num_nodes: int = 1, gpus_per_node: int = 8) -> int:
    """Fewest routed pairs a replica must carry to repay its copies and its extra GEMM call (>= 1).
    include_call=False: the copies only, for a planner that already charges each replica's GEMM call to
    its receiver (ReplicationConfig.replica_overhead_pairs)."""
    a, _ = expert_gemm_coeffs(model, profile)
    call = (1.0 + profile.bwd_compute_factor) * a if include_call else 0.0
    exposed = exposed_copy_seconds(model, profile, prefetch=prefetch)
    return max(1, math.ceil((call + exposed) / pair_seconds(model, profile, num_nodes, gpus_per_node)))


def replica_overhead_tokens(model, profile: HardwareProfile) -> int:
    """A replica's extra GEMM call expressed in routed pairs of GEMM work (a / b): what a planner should
    charge a receiving rank per replica so that the ranks' expert compute, not just their pair counts,
    ends even. (The call costs compute only; the planner weighs the ranks' InfiniBand receive
    separately, so the charge is in GEMM pairs, not in pair_seconds.)"""
    a, b = expert_gemm_coeffs(model, profile)
    return max(0, math.ceil(a / b))


def copy_cost_pairs(model, profile: HardwareProfile, *, prefetch: bool = True) -> float:
    """What one more replica copy costs the rank that sends or receives most copies, in routed pairs of
    GEMM work ((1 + f) * b each): the exposed part of its forward copy, backward re-copy and gradient
    reduce (all of it online; sent ahead, the contention share: relibra_verl.sim.cost). The planner's
    ReplicationConfig.copy_cost_pairs."""
    gemm, _ = _pair_costs(model, profile)
    return exposed_copy_seconds(model, profile, prefetch=prefetch) / gemm


def max_copies_per_owner(model, profile: HardwareProfile, tokens_per_rank: int, *,
                         mean_context: float = 1024.0) -> int:
    """Most replicas one owner should send per (micro-batch, layer), at least 1: the copies that fit the
    window a prefetched copy hides behind (this layer's attention forward on `tokens_per_rank` tokens).
    Sends beyond it are serialised on the owner's NVLink port and reach the critical path."""
    w, _ = replica_copy_seconds(model, profile)
    layer_flops, _ = non_moe_flops_per_token(model, mean_context)
    window = tokens_per_rank * layer_flops / (profile.dense_tflops * 1e12)
    return max(1, int(window // w))


def migration_seconds_per_expert(model, profile: HardwareProfile, *, within_node: bool = False) -> float:
    """Critical-path seconds to move one expert's full state (3*H*I x state_bytes) to a rank, over IB (or
    NVLink, within_node): what a reordering move must repay (relibra_verl.sim.cost, migration term)."""
    GBps = profile.nvlink_p2p_GBps if within_node else profile.ib_bulk_GBps
    return model.expert_params * profile.state_bytes_per_param / (GBps * 1e9) * profile.migration_exposed_share


def move_cost_pairs(model, profile: HardwareProfile) -> float:
    """A reordering move's critical-path cost in routed pairs on the busiest rank: the planner's
    ReorderConfig.move_cost_pairs. It trades a node assignment's balance (pairs per rank on the busiest
    node) against the experts it moves across nodes. A pair on the busiest node costs its expert compute
    (forward + backward) and, since node imbalance is what InfiniBand receive imbalance is made of, its
    4 all-to-all crossings (dispatch and combine, forward and backward) at the inter-node rate."""
    return migration_seconds_per_expert(model, profile) / sum(_pair_costs(model, profile))


def rank_move_cost_pairs(model, profile: HardwareProfile, num_nodes: int = 1, gpus_per_node: int = 8) -> float:
    """A move between ranks of one node in routed pairs on the busiest rank: ReorderConfig's
    rank_move_cost_pairs. The move sends the expert's full state over NVLink (its exposed share, as in
    the migration term); a pair on the busiest rank costs pair_seconds (GEMMs and all-to-all bytes)."""
    return (migration_seconds_per_expert(model, profile, within_node=True)
            / pair_seconds(model, profile, num_nodes, gpus_per_node))


def migration_pairs(model, profile: HardwareProfile, num_nodes: int,
                    gpus_per_node: int = 8) -> tuple[float, float]:
    """(over InfiniBand, over NVLink) what moving one expert costs the step (its exposed migration time, as in
    the cost model's migration term), in units of the replication objective J. With several nodes J is in
    pairs of c_gemm + c_ib (J = (1 - s) max T + s max X, s = inter_node_share); with one node J is the
    busiest rank's pairs, each costing its GEMMs and its bytes over NVLink (pair_seconds).
    ReorderConfig.migration_pairs."""
    gemm, ib = _pair_costs(model, profile)
    unit = gemm + ib if num_nodes > 1 else pair_seconds(model, profile, 1, gpus_per_node)
    return (migration_seconds_per_expert(model, profile) / unit,
            migration_seconds_per_expert(model, profile, within_node=True) / unit)


def inter_node_share(model, profile: HardwareProfile) -> float:
    """The share of a routed pair's cost that is its inter-node transfer when it crosses nodes:
    c_ib / (c_gemm + c_ib), c_ib = its bytes in the 4 all-to-alls at the inter-node rate, c_gemm = its
    expert compute (forward + backward). The planner's ReplicationConfig.inter_node_share (and
    ReorderConfig's): it weighs the busiest NIC against the busiest rank's (node's) GEMMs (the same
    per-pair cost as move_cost_pairs, which is in these pairs)."""
    gemm, ib = _pair_costs(model, profile)
    return ib / (gemm + ib)


@dataclasses.dataclass(frozen=True)
class ExpertShape:
    """The part of a model the planning inputs need: hidden size H and expert intermediate size I (a
    trainer has them from Megatron's config; `name` selects a measured GEMM fit of the profile, if any)."""

    hidden: int
    moe_intermediate: int
    name: str = ""

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate


def planner_limits(model, profile: HardwareProfile, num_nodes: int, gpus_per_node: int, *,
                   prefetch: bool = True) -> dict:
    """The time-aware planner inputs that need no attention shapes: ReplicationConfig's min_replica_tokens
    (the copies only: the GEMM call is replica_overhead_pairs, charged to the receiver; prefetch: copies
    sent ahead), replica_overhead_pairs, copy_cost_pairs and inter_node_share (also ReorderConfig's, where
    the NIC-aware node assignment is on), ReorderConfig's move_cost_pairs and rank_move_cost_pairs.
    model: a ModelPreset or an ExpertShape."""
    return {"min_replica_tokens": min_replica_tokens(model, profile, prefetch=prefetch, include_call=False,
                                                     num_nodes=num_nodes, gpus_per_node=gpus_per_node),
            "replica_overhead_pairs": replica_overhead_tokens(model, profile),
            "copy_cost_pairs": copy_cost_pairs(model, profile, prefetch=prefetch),
            "inter_node_share": inter_node_share(model, profile),
            "move_cost_pairs": move_cost_pairs(model, profile),
            "rank_move_cost_pairs": rank_move_cost_pairs(model, profile, num_nodes, gpus_per_node)}


def planner_configs(model, profile: HardwareProfile | None, num_nodes: int, gpus_per_node: int, *,
                    prefetch: bool = True, reorder_inter_node_share: float | None = 0.0,
                    max_moves_per_layer: int | None = None):
    """(ReplicationConfig, ReorderConfig) of the relibra planner for a model's expert shape on a hardware
    profile: what the verl trainer plans with (and bench-planner times). profile None: pair counts (no
    time-aware limits; the replication planner's default weight of the busiest NIC).
    reorder_inter_node_share: the reorder's NIC-aware node assignment (0: off, it costs planner time;
    None: the profile's inter_node_share). model: a ModelPreset or an ExpertShape."""
    if profile is None:
        return (ReplicationConfig(), ReorderConfig(max_moves_per_layer=max_moves_per_layer,
                                                   inter_node_share=reorder_inter_node_share or 0.0))
    limits = planner_limits(model, profile, num_nodes, gpus_per_node, prefetch=prefetch)
    if reorder_inter_node_share is None:
        reorder_inter_node_share = limits["inter_node_share"]
    replication = ReplicationConfig(min_replica_tokens=limits["min_replica_tokens"],
                                    replica_overhead_pairs=limits["replica_overhead_pairs"],
                                    copy_cost_pairs=limits["copy_cost_pairs"],
                                    inter_node_share=limits["inter_node_share"])
    reorder = ReorderConfig(max_moves_per_layer=max_moves_per_layer, move_cost_pairs=limits["move_cost_pairs"],
                            rank_move_cost_pairs=limits["rank_move_cost_pairs"],
                            inter_node_share=reorder_inter_node_share,
                            migration_pairs=migration_pairs(model, profile, num_nodes, gpus_per_node))
    return replication, reorder
