"""Replication-aware dispatch equals stock Megatron (same replayed routing) on 4 gloo ranks.

No hang possible: the shared fixture runs all ranks under spawn_ranks(timeout=240).
"""
from __future__ import annotations

import math

import pytest

FP32_TOL = 1e-5
BF16_TOL = 2e-2


def _case(suite, name):
    res = [r[name] for r in suite]
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r}: {x}"
    return res


def _max_rel(res):
    """Largest relative difference over every rank and tensor; inf if any is NaN (never dropped by max)."""
    rels = [rel for x in res for _, rel in x["diffs"].values()]
    return math.inf if any(math.isnan(r) for r in rels) else max(rels)


@pytest.mark.parametrize("name", ["random_r2_s0", "random_r2_s1", "random_r1_s2", "adversarial", "mismatched",
                                  "r0", "no_plan", "random_r2_no_prefetch"])
def test_fp32_exact(megatron_suite, name):
    res = _case(megatron_suite, name)
    assert _max_rel(res) <= FP32_TOL
    # every routed pair computed exactly once (invariant 1)
    assert sum(res[0]["before"]) == sum(res[0]["after"])
    names = set(res[0]["diffs"])
    assert {"output", "input_grad", "router_grad:router.weight"} <= names
    assert sum(n.startswith("expert_grad:") for n in names) == 4  # 2 local experts x fc1/fc2


def test_replicas_really_used(megatron_suite):
    res = _case(megatron_suite, "random_r2_s0")
    assert sum(x["sync_bytes"] for x in res) > 0 and sum(x["grad_bytes"] for x in res) > 0
    assert res[0]["before"] != res[0]["after"]


def test_adversarial_balances(megatron_suite):
    res = _case(megatron_suite, "adversarial")
    before, after = res[0]["before"], res[0]["after"]
    assert after[0] < before[0] and after[1] > before[1]


def test_r0_moves_nothing(megatron_suite):
    res = _case(megatron_suite, "r0")
    assert all(x["sync_bytes"] == 0 and x["pool_bytes"] == 0 for x in res)
    assert res[0]["before"] == res[0]["after"]


def test_no_plan_falls_back_and_counts(megatron_suite):
    res = _case(megatron_suite, "no_plan")
    assert all(x["fallback"] >= 1 for x in res)


def test_bf16_close(megatron_suite):
    res = _case(megatron_suite, "bf16")
    assert _max_rel(res) <= BF16_TOL


@pytest.mark.parametrize("name", ["two_layers", "two_layers_no_prefetch", "four_layers_sparse",
                                  "three_layers_recompute"])
def test_layers_micro_batches_shared_pool(megatron_suite, name):
    res = _case(megatron_suite, name)
    assert max(x["max_rel"] for x in res) <= FP32_TOL
    assert sum(x["sync_bytes"] for x in res) > 0


def test_prefetch_sends_ahead_within_two_buffers(megatron_suite):
    on, off = _case(megatron_suite, "two_layers"), _case(megatron_suite, "two_layers_no_prefetch")
    for a, b in zip(on, off):
        assert a["max_rel"] == b["max_rel"]  # same arithmetic, only the transfers move
        assert b["ahead"] == 0 and b["reused"] == 0 and b["blocking"] > 0
        assert a["blocking"] == 0 and a["ahead"] > 0 and a["reused"] > 0  # backward reuses the forward's weights
        assert a["sync_bytes"] < b["sync_bytes"]
        R = 2
        assert b["pool_bytes"] == R * a["numel_bytes"] and a["pool_bytes"] == 2 * R * a["numel_bytes"]


def test_prefetch_with_empty_nodes_and_layers(megatron_suite):
    """Layers where a node (or every node) holds no replica: nothing hangs, nothing is fetched on demand."""
    for x in _case(megatron_suite, "four_layers_sparse"):
        assert x["blocking"] == 0 and x["ahead"] > 0
    for x in _case(megatron_suite, "three_layers_recompute"):  # the recompute's send-ahead goes to l-1
        assert x["blocking"] == 0 and x["ahead"] > 0


def test_extend_plan_installs_the_rest_of_the_mini_batch(megatron_suite):
    for r in megatron_suite:
        x = r["extend_plan"]
        assert "outside the plan's 1" in x["outside"]          # micro-batch 1 needs the rest of the plan
        assert x["micro_batches"] == 2 and x["micro_batch"] == 1 and x["tables_kept"]


@pytest.mark.parametrize("name,needle", [("bad_other_E", "plan is for E=16"),
                                         ("bad_off_node", "off its home node"),
                                         ("bad_diverging", "different relibra plans"),
                                         ("bad_extend_plan", "does not begin with the installed plan"),
                                         ("bad_extend_plan_one_rank_failed", "MemoryError: the planner thread")])
def test_bad_plans_raise_same_error_everywhere(megatron_suite, name, needle):
    errs = [r[name] for r in megatron_suite]
    assert all(e.get("error") == "RelibraRuntimeError" for e in errs), errs
    assert len({e["message"] for e in errs}) == 1
    assert needle in errs[0]["message"]


def test_three_steps_with_reordering_equal_plain(megatron_suite):
    res = _case(megatron_suite, "reorder_steps")
    for x in res:
        assert x["placed_differs"] and x["migration_bytes"] > 0 and x["same_keys"]
        for a, b in zip(x["ref_losses"], x["losses"]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
        assert x["weights_rel"] <= FP32_TOL and x["adam_rel"] <= FP32_TOL


def test_checkpoint_after_reorder_loads_into_plain_megatron(megatron_suite):
    res = _case(megatron_suite, "reorder_steps")
    assert max(x["ckpt_rel"] for x in res) <= FP32_TOL


def test_megatron_ddp_overlap_two_micro_batches_reorder(megatron_suite):
    res = _case(megatron_suite, "ddp_steps")
    for x in res:
        assert x["sync_bytes"] > 0
        for a, b in zip(x["ref_losses"], x["losses"]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a))
        assert x["weights_rel"] <= FP32_TOL


@pytest.mark.parametrize("name", ["recompute", "recompute_no_prefetch"])
def test_moe_recompute_pipeline_order(megatron_suite, name):
    res = _case(megatron_suite, name)
    assert max(x["max_rel"] for x in res) <= FP32_TOL
    assert sum(x["sync_bytes"] for x in res) > 0
