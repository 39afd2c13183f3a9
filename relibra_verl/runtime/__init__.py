"""Execute relibra plans inside Megatron-Core 0.19 (process groups live here; policy does not).

Glossary: see relibra_verl.planner.types (E, G, S, R, physical slots rank-major, copies, quotas).

Public API (verl glue):
  rt = RelibraRuntime(topo, ep_group, kernels="auto"|"triton"|"torch", strict=False, prefetch=True)
  rt.patch_layer(moe_layer, l)             # each MoELayer, in model order, once after the model is built
  apply_placement(rt, plan.expert_at_home, optimizer)   # after optimizer.step(), before the batch
  rt.set_plan(plan)                         # once per batch, every EP rank (validated + hash-checked)
  rt.set_micro_batch(m)                     # before each micro-batch's forward
  with canonical_order(rt, optimizer): ...  # state_dict / checkpoint / weight export in canonical order
  rt.metrics                                # bytes moved, pool size, send-ahead hits, fallbacks (step boundaries)
Modules: moe (dispatcher, experts, replica sync), slots (torch slot rule), reorder (migration),
cpu_compat (Megatron on CPU, no-op with CUDA), launch (gloo ranks with timeouts), harness/verify_run
(small Megatron layers for tests and `relibra-verl verify`).
"""
from relibra_verl.runtime.moe import RelibraRuntime, RelibraRuntimeError, RuntimeMetrics
from relibra_verl.runtime.reorder import apply_placement, canonical_order

__all__ = ["RelibraRuntime", "RelibraRuntimeError", "RuntimeMetrics", "apply_placement", "canonical_order"]
