"""Time-aware planning inputs derived from the cost model (for the planner's `min_replica_tokens` and
`max_copies_per_owner`).

A replica moves `t` pairs off an overloaded (hot) rank. The hot rank saves, per pair, (1 + f) * b of expert
time (f = bwd_compute_factor) plus the bytes it no longer receives in the 4 all-to-alls of the layer (dispatch
and combine, forward and backward: 4 * H * act_bytes over NVLink: replicas are filled from their own node).
The replica costs one more GEMM call on its receiver ((1 + f) * a: a token-count planner fills receivers to
the mean, so the receiver ends near the max) plus the exposed part of its weight copy (forward), re-copy
(backward) and gradient reduce (relibra_verl.sim.cost). It repays itself when

    t >= ((1 + f) * a + exposed_copy) / ((1 + f) * b + 4 * H * act_bytes / nvlink_a2a)

Online (prefetch=False) the whole copy is exposed; with the plan known ahead only the contention share is
(the copy hides behind the window before the layer). Checked on the bundled traces (deepseek-v2-lite, EP 16,
1024 tokens/rank): relibra's step time over min_replica_tokens 1 / 100 / 300 / 734 was 0.826 / 0.820 /
0.815 / 0.841 s; this formula gives 434 there.
"""
from __future__ import annotations

import math

from relibra_verl.sim.cost import expert_gemm_coeffs, non_moe_flops_per_token
from relibra_verl.sim.presets import ModelPreset
from relibra_verl.sim.profiles import HardwareProfile


def replica_copy_seconds(model: ModelPreset, profile: HardwareProfile) -> tuple[float, float]:
    """(weight copy, gradient reduce) seconds of one replica over NVLink."""
    p2p = profile.nvlink_p2p_GBps * 1e9
    return (model.expert_params * profile.weight_bytes_per_param / p2p,
            model.expert_params * profile.grad_bytes_per_param / p2p)


def min_replica_tokens(model: ModelPreset, profile: HardwareProfile, *, prefetch: bool = True,
                       include_call: bool = True) -> int:
    """Fewest routed pairs a replica must carry to repay its copies and its extra GEMM call (>= 1).
    include_call=False: the copies only, for a planner that already charges each replica's GEMM call to
    its receiver (ReplicationConfig.replica_overhead_pairs)."""
    a, b = expert_gemm_coeffs(model, profile)
    f = profile.bwd_compute_factor
    w, g = replica_copy_seconds(model, profile)
    copy = 2.0 * w + g  # forward copy, backward re-copy, gradient reduce
    exposed = copy * (profile.replica_contention_share if prefetch else 1.0)
    saving = (1.0 + f) * b + 4.0 * model.hidden * profile.act_bytes / (profile.nvlink_a2a_GBps * 1e9)
    call = (1.0 + f) * a if include_call else 0.0
    return max(1, math.ceil((call + exposed) / saving))


def replica_overhead_tokens(model: ModelPreset, profile: HardwareProfile) -> int:
    """A replica's extra GEMM call expressed in routed pairs (a / b): what a planner balancing token counts
    should charge a receiving rank per replica so that it balances time."""
    a, b = expert_gemm_coeffs(model, profile)
    return max(0, math.ceil(a / b))


def max_copies_per_owner(model: ModelPreset, profile: HardwareProfile, tokens_per_rank: int, *,
                         mean_context: float = 1024.0) -> int:
    """Most replicas one owner should send per (micro-batch, layer), at least 1: the copies that fit the
    window a prefetched copy hides behind (this layer's attention forward on `tokens_per_rank` tokens).
    Sends beyond it are serialised on the owner's NVLink port and reach the critical path."""
    w, _ = replica_copy_seconds(model, profile)
    layer_flops, _ = non_moe_flops_per_token(model, mean_context)
    window = tokens_per_rank * layer_flops / (profile.dense_tflops * 1e12)
    return max(1, int(window // w))


def migration_seconds_per_expert(model: ModelPreset, profile: HardwareProfile) -> float:
    """Critical-path seconds to move one expert's full state (3*H*I x state_bytes) over IB from one rank:
    what a reordering move must repay (relibra_verl.sim.cost, migration term)."""
    return (model.expert_params * profile.state_bytes_per_param / (profile.ib_bulk_GBps * 1e9)
            * profile.migration_exposed_share)


def move_cost_pairs(model: ModelPreset, profile: HardwareProfile) -> float:
    """A reordering move's critical-path cost in routed pairs on the busiest rank: the planner's
    ReorderConfig.move_cost_pairs. It trades a node assignment's balance (pairs per rank on the busiest
    node) against the experts it moves across nodes. A pair on the busiest node costs its expert compute
    (forward + backward) and, since node imbalance is what InfiniBand receive imbalance is made of, its
    4 all-to-all crossings (dispatch and combine, forward and backward) at the inter-node rate."""
    _, b = expert_gemm_coeffs(model, profile)
    per_pair = (1.0 + profile.bwd_compute_factor) * b + 4.0 * model.hidden * profile.act_bytes / (profile.ib_a2a_GBps * 1e9)
    return migration_seconds_per_expert(model, profile) / per_pair
