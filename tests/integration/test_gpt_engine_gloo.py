"""verl's real Megatron engine with a real Megatron GPT-MoE, EP 2 on gloo: relibra on == relibra off.

`MegatronEngineWithLMHead` from verl's EngineRegistry with its real `__init__`, a tiny GPT-MoE (local spec:
one dense layer, two MoE layers, E=8, top-2, all-to-all dispatcher, permute fusion off, MoE recompute) in
Megatron DDP (overlap_grad_reduce) as its module, Megatron's optimizer from verl's `_build_optimizer`,
verl's real `forward_step` (packed THD micro-batches, R3 replay through `set_router_replay_data`) wrapped
by relibra's patch, two optimizer steps through `train_batch`, then `infer_batch` and
`get_per_tensor_param`. See _gpt_harness.py for the CPU stand-ins.
"""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    import _gpt_harness

    from relibra_verl.runtime.launch import spawn_ranks

    return spawn_ranks(_gpt_harness.run, 2, str(tmp_path_factory.mktemp("gpt")), timeout=240)


def _identity(placement) -> bool:
    return bool((placement == np.arange(placement.shape[1])).all())


def test_real_engine_and_forward_step_under_relibra(gpt_runs):
    for res in gpt_runs:
        assert res["forward_step_is_verls"], "MegatronEngineWithLMHead.forward_step is not relibra(verl's)"
        assert {"forward_step", "forward_backward_batch", "prepare_micro_batches",
                "optimizer_step"} <= {n.rsplit(".", 1)[-1] for n in res["patched"]}
        for name in ("off", "on"):
            assert res[name]["engine_class"] == (
                "verl.workers.engine.megatron.transformer_impl.MegatronEngineWithLMHead")
            # verl's R3 replay ran once per micro-batch (2 steps x >= 2 micro-batches), with the routes of
            # all three decoder layers (the dense layer's zeros included)
            calls = res[name]["replay_calls"]
            assert len(calls) >= 4 and set(calls) == {(3, 2)}
            # every MoE router forward (2 layers per micro-batch) routed the replayed rows to the rollout's
            # experts; each sequence's last row was left to the live router
            checks = res[name]["router_checks"]
            assert len(checks) == 2 * len(calls)
            assert all(wrong == 0 and 0 < replayed < rows for rows, replayed, wrong in checks)
        # relibra counted exactly the rows verl did not replay as unknown (2 MoE layers x top-2 per row)
        for m, mine in zip(res["on"]["metrics"], res["on"]["router_checks_by_step"], strict=True):
            assert m["relibra/unknown_pairs"][0] == sum((rows - rep) * 2 for rows, rep, _ in mine)


def test_two_optimizer_steps_equal_losses(gpt_runs):
    for rank, res in enumerate(gpt_runs):
        off, on = res["off"], res["on"]
        assert len(off["losses"]) == len(on["losses"]) == 2
        np.testing.assert_allclose(on["losses"], off["losses"], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}")
        assert off["losses"][0] != off["losses"][1]
        # Megatron's optimizer: grad norm over all (dense + expert) gradients, before clipping at 1.0
        np.testing.assert_allclose(on["grad_norms"], off["grad_norms"], rtol=1e-5, err_msg=f"rank {rank}")
        assert all(g > 0 for g in off["grad_norms"])
        for name, w in off["dense"].items():  # attention, norms, router, embedding, head
            np.testing.assert_allclose(on["dense"][name], w, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} {name}")


def test_forward_only_log_probs_equal(gpt_runs):
    """verl's compute_log_prob path (infer_batch, R3) after the two steps: same log-probs with relibra."""
    for rank, res in enumerate(gpt_runs):
        off, on = res["off"]["log_probs"], res["on"]["log_probs"]
        assert off.shape == on.shape and off.size > 0
        np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5, err_msg=f"rank {rank}")


def test_replicas_used_and_plan_selected_per_micro_batch(gpt_runs):
    assert all(r["on"]["runtime"] is not None for r in gpt_runs), "relibra runtime was not built"
    assert all(r["on"]["runtime_fallbacks"] == 0 for r in gpt_runs)      # every MoE call ran under a plan
    assert sum(r["on"]["replica_sync_bytes"] for r in gpt_runs) > 0      # replica slots computed tokens
    for res in gpt_runs:
        assert all(m == {} for m in res["off"]["metrics"])
        for m in res["on"]["metrics"]:
            assert m["relibra/fallbacks"] == [0.0]
            assert m["relibra/imbalance_after"][0] <= m["relibra/imbalance_before"][0]
            assert m["relibra/unknown_pairs"][0] > 0   # each sequence's last row: live router, not planned
        assert any(m["relibra/replicas"][0] > 0 for m in res["on"]["metrics"])
        # balance as executed: tokens the replica slots computed, counted by the runtime
        assert any(m["relibra/replica_tokens"][0] > 0 for m in res["on"]["metrics"])
        assert all("relibra/imbalance_after_planned" in m for m in res["on"]["metrics"])
        # relibra's wrapper around verl's forward_step selects micro-batch m before its forward and again
        # when its backward starts (grad hook on verl's nested log_probs output), in schedule order
        # (forward only: before each forward, no backward)
        sel = res["on"]["selections"]
        marks = [i for i, s in enumerate(sel) if s[0] in ("step", "infer")] + [len(sel)]
        assert [sel[i][0] for i in marks[:-1]] == ["step", "step", "infer"]
        for a, b in zip(marks, marks[1:]):
            events = sel[a + 1:b]
            phases = ("forward",) if sel[a][0] == "infer" else ("forward", "backward")
            M = len(events) // len(phases)
            assert M >= 2 and events == [(m, m, phase) for m in range(M) for phase in phases]


def test_reordered_then_exported_in_canonical_order(gpt_runs):
    assert any(not _identity(r["on"]["placement"]) for r in gpt_runs)
    assert any(m["relibra/moved_experts"][0] > 0 for m in gpt_runs[0]["on"]["metrics"])
    for rank, res in enumerate(gpt_runs):
        off, on = res["off"]["export"], res["on"]["export"]
        assert sorted(off) == sorted(on) and len(off) == 2 * 4 * 2   # 2 MoE layers x 4 local experts x 2
        for name in off:
            np.testing.assert_allclose(on[name], off[name], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} {name}")
