"""Grouped-GEMM experts: Megatron's real TEGroupedMLP (over relibra's torch grouped linear with Transformer
Engine's interface) with replica slots as extra groups of the same call, against the same stock layer, on 4
gloo ranks (EP 4 = 2 nodes x 2). The shared fixture runs every rank under spawn_ranks(timeout=...)."""
from __future__ import annotations

import pytest
from test_dispatch_exact import BF16_TOL, FP32_TOL, _case, _max_rel

S, R = 2, 2


@pytest.mark.parametrize("name", ["grouped_random_r2_s0", "grouped_random_r1_s2", "grouped_adversarial",
                                  "grouped_no_plan"])
def test_grouped_fp32_exact(megatron_suite, name):
    res = _case(megatron_suite, name)
    assert _max_rel(res) <= FP32_TOL
    assert sum(res[0]["before"]) == sum(res[0]["after"])
    names = set(res[0]["diffs"])
    assert {"output", "input_grad", "router_grad:router.weight"} <= names
    assert {f"expert_grad:experts.linear_fc{j}.weight{i}" for j in (1, 2) for i in range(S)} <= names


def test_grouped_replicas_are_groups_of_one_call(megatron_suite):
    """One fc1 call per layer call, with S home + R replica groups where the node holds replicas."""
    res = _case(megatron_suite, "grouped_random_r2_s0")
    assert res[0]["has_replicas"] and res[0]["before"] != res[0]["after"]
    for x in res:
        assert len(x["fc1_calls"]) == 1, x["fc1_calls"]
    assert any(x["fc1_calls"] == [S + R] for x in res)
    assert sum(x["sync_bytes"] for x in res) > 0 and sum(x["grad_bytes"] for x in res) > 0


def test_grouped_bf16_close(megatron_suite):
    assert _max_rel(_case(megatron_suite, "grouped_bf16")) <= BF16_TOL


@pytest.mark.parametrize("name", ["grouped_three_layers", "grouped_two_layers_no_prefetch",
                                  "grouped_four_layers_sparse", "grouped_three_layers_recompute"])
def test_grouped_layers_micro_batches(megatron_suite, name):
    res = _case(megatron_suite, name)
    assert max(x["max_rel"] for x in res) <= FP32_TOL
    assert sum(x["sync_bytes"] for x in res) > 0 and sum(x["grad_async"] for x in res) > 0


@pytest.mark.parametrize("name", ["grouped_three_layers", "three_layers_events"])
def test_gradient_return_overlaps_the_next_layers_backward(megatron_suite, name):
    """Recorded order on every rank (grouped and sequential experts): layer l's replica gradients are sent,
    layer l-1's backward is issued, and only then is the return into layer l's owners waited for."""
    for rank, x in enumerate(_case(megatron_suite, name)):
        assert max_rel_ok(x)
        ev = x["events"]
        sends = [i for i, e in enumerate(ev) if e == ("grad_send", 2)]
        assert sends, (rank, ev)
        for first in sends:  # each micro-batch's backward
            nxt = ev.index(("experts_backward", 1), first)
            wait = ev.index(("grad_wait", 2), first)
            assert first < nxt < wait, (rank, ev)


def max_rel_ok(x) -> bool:
    return x["max_rel"] <= FP32_TOL


def test_grouped_ddp_overlap_waits_at_the_bucket(megatron_suite):
    """Megatron DDP with overlap_grad_reduce, 3 steps, reordering: equal to stock; with attach_ddp the returns
    stay in flight until their bucket is reduced, without it they are waited for at once (and still exact)."""
    for name, mode in (("grouped_ddp_steps", "async"), ("grouped_ddp_steps_unattached", "blocking")):
        res = _case(megatron_suite, name)
        for x in res:
            for a, b in zip(x["ref_losses"], x["losses"]):
                assert abs(a - b) <= FP32_TOL * max(1.0, abs(a))
            assert x["weights_rel"] <= FP32_TOL
        if mode == "async":
            assert all(x["grad_blocking"] == 0 for x in res) and sum(x["grad_async"] for x in res) > 0
        else:
            assert sum(x["grad_blocking"] for x in res) > 0


def test_grouped_distributed_optimizer_equal_plain(megatron_suite):
    for x in _case(megatron_suite, "grouped_distopt_fp32_replicas"):
        assert x["sync_bytes"] > 0 and x["placed_differs"] and x["same_file_layout"]
        for a, b in zip(x["ref_losses"], x["losses"]):
            assert abs(a - b) <= FP32_TOL * max(1.0, abs(a))
        for k in ("weights_rel", "state_rel", "ckpt_weights_rel", "ckpt_state_rel", "ckpt_file_rel"):
            assert x[k] <= FP32_TOL, (k, x[k])


@pytest.mark.parametrize("cfg,needle", [({"use_transformer_engine_op_fuser": True}, "use_transformer_engine_op_fuser"),
                                        ({"fp8": "e4m3"}, "FP8/FP4"), ({"moe_permute_fusion": True}, None)])
def test_grouped_configs_refused_by_name_or_accepted(cfg, needle):
    import types

    from relibra_verl.runtime.moe import RelibraRuntimeError, _check_supported

    config = types.SimpleNamespace(moe_grouped_gemm=True, **cfg)
    if needle is None:
        _check_supported(config)  # permute fusion: relibra's permute takes the place of TE's
        return
    with pytest.raises(RelibraRuntimeError, match=needle):
        _check_supported(config)
