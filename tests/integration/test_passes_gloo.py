"""The forward-only passes of a GRPO step on verl's real Megatron engine path, EP 2 on gloo: the actor's
old-log-prob pass and the reference model's pass balanced by relibra give the log-probs of the unbalanced
run, and a wrong placement does not."""
from __future__ import annotations

import numpy as np
import pytest

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs():
    import _passes_harness

    from relibra_verl.runtime.launch import spawn_ranks

    return spawn_ranks(_passes_harness.run, 2, timeout=300)


def _assert_equal(a, b, what):
    assert len(a) == len(b) and len(a) > 0
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_allclose(x, y, **TOL, err_msg=f"{what} sequence {i}")


def test_log_probs_equal_with_relibra_on_and_off(runs):
    for rank, res in enumerate(runs):
        for step in range(2):
            _assert_equal(res["on"]["logprob"][step], res["off"]["logprob"][step], f"rank {rank} step {step} logprob")
            _assert_equal(res["on"]["ref"][step], res["off"]["ref"][step], f"rank {rank} step {step} ref")
        np.testing.assert_allclose(res["on"]["losses"], res["off"]["losses"], **TOL)
        # the update changed the actor: step 2's old log-probs are not step 1's model's
        assert res["off"]["losses"][0] != res["off"]["losses"][1]


def test_the_passes_ran_on_a_new_placement(runs):
    """The log-prob pass placed the batch (experts moved, with the optimizer state) and the ref engine
    reordered its weights; the update kept the log-prob pass's placement (no move after its step)."""
    m0 = runs[0]["on"]["metrics"][0]
    assert m0["relibra/logprob/moved_experts"][0] > 0
    assert m0["relibra/moved_experts"] == [0.0]
    for res in runs:
        assert not (res["on"]["placement"] == np.arange(res["on"]["placement"].shape[1])).all()
        assert not (res["on"]["ref_placement"] == np.arange(res["on"]["ref_placement"].shape[1])).all()


def test_per_pass_metrics(runs):
    """Each pass reports its balance; on the first step (identity placement, skewed loads) both forward
    passes end far better balanced than they started, measured from the tokens each slot computed. Later
    steps are not asserted on: the measured figures count the routes verl leaves to the live router
    (each sequence's last row) and, for the ref, routes that differ from the prediction."""
    for step, m in enumerate(runs[0]["on"]["metrics"]):
        for p in ("logprob", "ref"):
            keys = {f"relibra/{p}/{k}" for k in ("imbalance_before", "imbalance_after", "replica_tokens",
                                                  "fallbacks", "plan_ms", "replicas", "moved_experts")}
            assert set(m) >= keys, sorted(keys - set(m))
            assert m[f"relibra/{p}/fallbacks"] == [0.0]
            assert m[f"relibra/{p}/imbalance_after_planned"][0] <= m[f"relibra/{p}/imbalance_before_planned"][0]
            if step == 0:
                assert m[f"relibra/{p}/imbalance_after"][0] < m[f"relibra/{p}/imbalance_before"][0] - 0.3, p
        assert m["relibra/ref/replica_tokens"][0] > 0          # the ref's live tokens used its replicas
        assert "relibra/imbalance_before" in m               # the update's own, unprefixed
    assert all(m == {} for m in runs[0]["off"]["metrics"])


def test_a_wrong_placement_breaks_equality(runs):
    """The sabotaged run's runtime believes two experts of layer 0 swapped that were not: its log-probs differ
    from the unbalanced run's (what the equality test would catch)."""
    worst = 0.0
    for res in runs:
        for step in range(2):
            for x, y in zip(res["sabotaged"]["logprob"][step], res["off"]["logprob"][step]):
                worst = max(worst, float(np.abs(x - y).max()))
    assert worst > 1e-3


def test_passes_switched_off(runs):
    """passes: {logprob: false, ref: false}: the forward passes run Megatron's dispatch (same log-probs, no
    relibra/logprob|ref metrics) and the update plans and applies the next placement after its step."""
    for res in runs:
        for a, b in ((res["update_only"]["logprob"][0], res["off"]["logprob"][0]),
                     (res["update_only"]["ref"][0], res["off"]["ref"][0])):
            _assert_equal(a, b, "update_only")
    m = runs[0]["update_only"]["metrics"][0]
    assert not any(k.startswith(("relibra/logprob/", "relibra/ref/")) for k in m)
    assert m["relibra/moved_experts"][0] > 0 and m["relibra/replicas"][0] > 0


def test_ref_pass_of_a_lora_actor(runs):
    """With LoRA verl computes the ref log-probs on the actor inside disable_adapter(): relibra plans it as
    the ref pass (relibra/ref/*, routes replayed) on the actor's placement (no move), exact."""
    for res in runs:
        _assert_equal(res["on"]["ref_in_actor"], res["off"]["ref_in_actor"], "ref in actor")
    m = runs[0]["on"]["ref_in_actor_metrics"]
    assert m["relibra/ref/fallbacks"] == 0.0 and m["relibra/ref/replicas"] > 0
    assert "relibra/ref/moved_experts" not in m and not any(k.startswith("relibra/logprob/") for k in m)
    assert runs[0]["off"]["ref_in_actor_metrics"] == {}


def test_optimizer_offload_defers_the_placement_to_the_update(runs):
    """With optimizer offload the optimizer state is on the host during verl's log-prob call: the log-prob
    pass plans the placement and runs on the previous one (with replicas); the update's first mini-batch
    applies it. Exact either way."""
    for res in runs:
        _assert_equal(res["optimizer_offload"]["logprob"][0], res["off"]["logprob"][0], "offload logprob")
        np.testing.assert_allclose(res["optimizer_offload"]["losses"], res["off"]["losses"][:1], **TOL)
    m = runs[0]["optimizer_offload"]["metrics"][0]
    assert m["relibra/logprob/moved_experts"][0] > 0 and m["relibra/moved_experts"] == [0.0]
    # the log-prob pass ran on the identity placement: its "before" is the on-run's (which it also found)
    on = runs[0]["on"]["metrics"][0]
    assert m["relibra/logprob/imbalance_before"] == on["relibra/logprob/imbalance_before"]
    assert m["relibra/logprob/imbalance_after"][0] > on["relibra/logprob/imbalance_after"][0]
