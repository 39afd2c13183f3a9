"""The EPLB baselines used the way a user would use them, step after step.

  eplb-periodic  EPLB rebalanced every `interval` micro-batches from the loads of the last `window`
                 micro-batches, the placement kept in between: what serving systems run (vLLM's EPLB:
                 EPLBConfig.window_size = 1000 and step_interval = 3000 engine steps by default,
                 vllm/config/parallel.py). A training forward pass over one micro-batch stands for one
                 engine step. The run starts right after a rebalance made from the history before it (the
                 freshest placement a periodic schedule can have: favours the baseline).
  eplb-history   EPLB on the previous batch's loads, every step.
  eplb-oracle    EPLB on this batch's own loads; with a cost function, it keeps the previous placement
                 when the new one does not repay its migration on this batch (the best use of an oracle).
                 The first step always rebalances (its move away from Megatron's layout happens once per
                 run and is reported apart from the steady state).

Every EPLB placement gets the same mechanism and price as relibra's (relibra_verl.sim.cost): redundant
copies sent ahead, their gradients reduced in the backward, optimizer state moved for home slots only.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from relibra_verl.planner.strategies import StrategyResult, eplb_result, run_strategy
from relibra_verl.planner.types import Topology

# vLLM's EPLBConfig defaults (vllm/config/parallel.py): window_size=1000, step_interval=3000 engine steps
VLLM_WINDOW = 1000
VLLM_INTERVAL = 3000


@dataclasses.dataclass(frozen=True)
class PeriodicSchedule:
    """eplb-periodic's knobs, in micro-batches (forward passes): rebalance every `interval` from the loads
    of the last `window`."""

    window: int = VLLM_WINDOW
    interval: int = VLLM_INTERVAL

    def __post_init__(self):
        if self.window < 1 or self.interval < 1:
            raise ValueError(f"eplb-periodic window and interval must be >= 1 micro-batch, got {self.window}, {self.interval}")


def rebalance_steps(micro_batches: list[int], interval: int) -> list[bool]:
    """Which steps rebalance before they run: step 0 (the schedule starts at a rebalance), then the first
    step at which `interval` micro-batches have run since the last rebalance."""
    out, since = [], 0
    for i, m in enumerate(micro_batches):
        due = i == 0 or since >= interval
        out.append(due)
        since = (0 if due else since) + m
    return out


def window_counts(history: list[np.ndarray], window: int) -> np.ndarray | None:
    """The last `window` micro-batches of a list of counts [M_i, L, G, E] (oldest first), or None when
    empty."""
    if not history:
        return None
    return np.concatenate(history, axis=0)[-window:]


def run_eplb_periodic(counts: list[np.ndarray], history: list[np.ndarray], topo: Topology, num_groups: int,
                      schedule: PeriodicSchedule = PeriodicSchedule()) -> list[StrategyResult]:
    """eplb-periodic over a run: counts [M, L, G, E] per step; history: the batches before the run
    (oldest first; empty: EPLB starts from uniform loads)."""
    due = rebalance_steps([c.shape[0] for c in counts], schedule.interval)
    out, prev = [], None
    for i, c in enumerate(counts):
        if due[i]:
            res = run_strategy("eplb-periodic", c, topo, history_counts=window_counts(list(history) + counts[:i], schedule.window),
                               prev_placement=prev, num_groups=num_groups)
        else:
            res = eplb_result(np.asarray(c, dtype=np.int64), topo, prev, prev)
            res.name = "eplb-periodic"
        out.append(res)
        prev = res.placement
    return out


def run_eplb_oracle(counts: list[np.ndarray], topo: Topology, num_groups: int,
                    step_seconds: Callable[[StrategyResult, np.ndarray | None], float] | None = None) -> list[StrategyResult]:
    """eplb-oracle over a run. step_seconds(result, prev_placement): the step's time (migration included)
    under the cost model; given, each step after the first keeps the previous placement when that is not
    slower than rebalancing. Without it every step rebalances."""
    out, prev = [], None
    for i, c in enumerate(counts):
        res = run_strategy("eplb-oracle", c, topo, prev_placement=prev, num_groups=num_groups)
        if step_seconds is not None and prev is not None:
            kept = eplb_result(np.asarray(c, dtype=np.int64), topo, prev, prev, res.plan_ms)
            kept.name = "eplb-oracle"
            if step_seconds(kept, prev) <= step_seconds(res, prev):
                res = kept
        out.append(res)
        prev = res.placement
    return out
