"""Reordering with Megatron's real DistributedOptimizer (get_megatron_optimizer, use_distributed_optimizer=True,
Adam) on 4 gloo ranks (EP 4 = 2 nodes x 2, expert DP 1), with the CPU adaptations of runtime.cpu_compat.

The shared fixture runs every rank under spawn_ranks(timeout=...): no hang possible.
"""
from __future__ import annotations

from test_dispatch_exact import FP32_TOL, _case


def test_bf16_fp32_main_adam_reorder_is_bitwise(megatron_suite):
    """bf16 weights, fp32 main params and Adam moments move with their expert: 3 steps with a new placement
    before each equal 3 plain steps bit for bit, and so do the checkpoint files written after reordering."""
    for x in _case(megatron_suite, "distopt_bf16_reorder"):
        assert x["optimizer"] == ["DistributedOptimizer", "DistributedOptimizer"]  # dense + expert
        assert x["n_state"] == 12  # 4 expert params x (main param, exp_avg, exp_avg_sq)
        assert x["placed_differs"] and x["migration_bytes"] > 0
        # per element: bf16 weight 2 B, fp32 main param 4 B, Adam m + v 8 B (Adam states exist after step 1)
        k = x["by_kind"]
        assert set(k) == {"weights", "main_params", "optimizer_state"}
        assert k["main_params"] == 2 * k["weights"] and sum(k.values()) == x["migration_bytes"]
        assert 2 * k["main_params"] > k["optimizer_state"] > 0
        assert x["bitwise"], x
        assert x["ckpt_weights_rel"] == 0.0 and x["ckpt_state_rel"] == 0.0


def test_fp32_replicas_overlap_reorder_equal_plain(megatron_suite):
    """Replicas (grads into main_grad before DDP's overlapped bucket reduce-scatter), reordering and the real
    DistributedOptimizer: losses, canonical weights, Adam state and checkpoint equal the plain run."""
    for x in _case(megatron_suite, "distopt_fp32_replicas"):
        assert x["sync_bytes"] > 0 and x["placed_differs"] and x["same_file_layout"]
        assert "main_params" not in x["by_kind"]  # fp32 params: the main param is the param itself, moved once
        for a, b in zip(x["ref_losses"], x["losses"]):
            assert abs(a - b) <= FP32_TOL * max(1.0, abs(a))
        for k in ("weights_rel", "state_rel", "ckpt_weights_rel", "ckpt_state_rel", "ckpt_file_rel"):
            assert x[k] <= FP32_TOL, (k, x[k])
