"""relibra's planner: pure numpy (and compiled kernels), no process groups, deterministic.

  plan_relibra       one batch's plan: placement (reorder.py) and per-micro-batch replicas (replicate.py)
  BatchPlan          what the runtime executes; Topology the EP group and its slots (types.py)
  ReorderConfig, ReplicationConfig   the planners' knobs; planner_configs derives them from a hardware
                     profile and a model's expert shape (configs.py), as the verl trainer does
  HardwareProfile, load_profile   the cost model's constants (hardware.py; the simulator re-exports them)
  validate_plan      design invariants 1-2 of a plan against its loads (validate.py)
  plan_outcome       where a plan computes every pair: per-rank pairs, traffic, GEMM calls (strategies.py)
"""
from relibra_verl.planner.configs import ExpertShape, planner_configs
from relibra_verl.planner.hardware import HardwareProfile, load_profile
from relibra_verl.planner.relibra import plan_relibra
from relibra_verl.planner.reorder import ReorderConfig, plan_placement
from relibra_verl.planner.replicate import ReplicationConfig, plan_replicas
from relibra_verl.planner.strategies import plan_outcome
from relibra_verl.planner.types import BatchPlan, PlanError, Topology, identity_placement
from relibra_verl.planner.validate import check_deterministic, validate_plan

__all__ = ["BatchPlan", "ExpertShape", "HardwareProfile", "PlanError", "ReorderConfig", "ReplicationConfig", "Topology",
           "check_deterministic", "identity_placement", "load_profile", "plan_outcome", "plan_placement", "plan_relibra",
           "plan_replicas", "planner_configs", "validate_plan"]
