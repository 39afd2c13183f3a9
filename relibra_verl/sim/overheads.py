"""What a balancing runtime pays per step besides the balanced work itself, from the sizes it moves.

relibra (relibra_verl.integration.trainer, relibra_verl.runtime.moe), per mini-batch:
  loads      one all-gather over the EP group of every rank's loads [M, L, E + 1] int64 (the +1: a flag
             column, so every rank takes the same fallback decision): each rank receives (G - 1) such
             blocks. On the critical path: the plan needs it.
  agreement  set_plan, and extend_plan when M > 1 (the background-planned rest), each one
             all_gather_object of (plan digest, error): two all-gathers of a few bytes (sizes, then the
             pickled payloads), latency-bound.
  install    the plan (replica_expert [M, L, G, R], replica_quota [M, L, G, R, G], expert_at_home [L, E],
             int64) copied host to device.
EPLB (the eplb-* strategies), per step:
  loads      one all-reduce of the loads [L, E] int64 over the EP group (vLLM's EPLB records them every
             step for its window; the oracle needs this step's before it).
  install    on a step that changes the placement: the physical map [L, P] int64 host to device.
megatron and ideal pay nothing.

A collective over the EP group runs at the inter-node all-to-all rate when the group spans nodes
(ib_a2a_GBps), else at the NVLink rate, plus a2a_latency_us per call. Ring all-reduce moves
2 (G - 1) / G of the buffer per rank; an all-gather (G - 1) blocks.
"""
from __future__ import annotations

import numpy as np

from relibra_verl.sim.profiles import HardwareProfile

INT64 = 8
AGREEMENT_COLLECTIVES = 2    # all_gather_object: sizes, then payloads


def _collective(bytes_per_rank: float, num_nodes: int, profile: HardwareProfile) -> float:
    GBps = profile.ib_a2a_GBps if num_nodes > 1 else profile.nvlink_a2a_GBps
    return profile.a2a_latency_us * 1e-6 + bytes_per_rank / (GBps * 1e9)


def relibra_runtime_sizes(M: int, L: int, G: int, E: int, R: int) -> dict:
    """Bytes relibra's runtime moves per mini-batch: the loads each rank receives in the all-gather, and
    the plan installed host to device."""
    return {"loads_allgather_bytes": (G - 1) * M * L * (E + 1) * INT64,
            "plan_install_bytes": (M * L * G * R * (1 + G) + L * E) * INT64}


def relibra_runtime_seconds(M: int, L: int, G: int, E: int, R: int, num_nodes: int, profile: HardwareProfile) -> dict:
    """Seconds per step of relibra's loads all-gather, plan agreement and plan install (see the module doc)."""
    size = relibra_runtime_sizes(M, L, G, E, R)
    agreements = 2 if M > 1 else 1
    return {"loads": _collective(size["loads_allgather_bytes"], num_nodes, profile) if G > 1 else 0.0,
            "agreement": agreements * AGREEMENT_COLLECTIVES * profile.a2a_latency_us * 1e-6 if G > 1 else 0.0,
            "install": size["plan_install_bytes"] / (profile.h2d_GBps * 1e9)}


def eplb_runtime_seconds(L: int, G: int, E: int, P: int, num_nodes: int, profile: HardwareProfile,
                         rebalanced: bool) -> dict:
    """Seconds per step of EPLB's loads all-reduce and, on a step that changes the placement, installing
    the physical map [L, P]."""
    buf = L * E * INT64
    return {"loads": _collective(2.0 * (G - 1) / G * buf, num_nodes, profile) if G > 1 else 0.0,
            "agreement": 0.0,
            "install": L * P * INT64 / (profile.h2d_GBps * 1e9) if rebalanced else 0.0}


def runtime_seconds(name: str, result, prev_placement, topo, profile: HardwareProfile) -> dict:
    """The runtime's per-step seconds {loads, agreement, install} of strategy `name` for one step's result
    (a planner StrategyResult: rank_tokens [M, L, G], placement)."""
    M, L, G = np.shape(result.rank_tokens)
    if name.startswith("relibra"):
        return relibra_runtime_seconds(M, L, G, topo.E, topo.R, topo.num_nodes, profile)
    if name.startswith("eplb"):
        placement = np.asarray(result.placement)
        changed = prev_placement is None or np.shape(prev_placement) != placement.shape or \
            bool((np.asarray(prev_placement) != placement).any())
        return eplb_runtime_seconds(L, G, topo.E, placement.shape[1], topo.num_nodes, profile, changed)
    return {"loads": 0.0, "agreement": 0.0, "install": 0.0}
