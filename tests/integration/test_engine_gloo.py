"""The trainer-side path on verl's real Megatron engine code, EP 2 on gloo: relibra on == relibra off."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def engine_runs():
    import _engine_harness

    from relibra_verl.runtime.launch import spawn_ranks

    return spawn_ranks(_engine_harness.run, 2, timeout=240)


def test_two_optimizer_steps_equal_losses(engine_runs):
    for rank, res in enumerate(engine_runs):
        off, on = res["off"], res["on"]
        assert len(off["losses"]) == len(on["losses"]) == 2
        np.testing.assert_allclose(on["losses"], off["losses"], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}")
        assert off["losses"][0] != off["losses"][1]           # the optimizer step changed the model
        if (on["placement"] == np.arange(on["placement"].shape[1])).all():  # not reordered: same layout
            for name, w in off["weights"].items():
                np.testing.assert_allclose(on["weights"][name], w, rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} {name}")


def test_reordered_then_exported_in_canonical_order(engine_runs):
    """After reordering (experts moved between EP ranks with their optimizer state), the weights verl sends
    to the rollout engine carry canonical names/order and equal the never-reordered run's."""
    assert any(not (r["on"]["placement"] == np.arange(r["on"]["placement"].shape[1])).all() for r in engine_runs)
    assert any(m["relibra/moved_experts"][0] > 0 for m in engine_runs[0]["on"]["metrics"])
    for rank, res in enumerate(engine_runs):
        off, on = res["off"]["export"], res["on"]["export"]
        assert sorted(off) == sorted(on) and len(off) > 0
        for name in off:
            np.testing.assert_allclose(on[name], off[name], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} {name}")
        # the reordered layout was restored after the export
        placement = res["on"]["placement"]
        assert placement.shape == (2, 8)


def test_relibra_ran_and_reported_metrics(engine_runs):
    res = engine_runs[0]
    assert res["on"]["runtime"] is not None, "relibra runtime was not built (plain dispatch)"
    assert res["on"]["runtime_fallbacks"] == 0                 # every MoE call ran under a plan
    assert sum(r["on"]["replica_sync_bytes"] for r in engine_runs) > 0   # replicas really computed tokens
    assert all(m == {} for m in res["off"]["metrics"])         # native engine: no relibra metrics
    for m in res["on"]["metrics"]:
        assert set(m) >= {"relibra/imbalance_before", "relibra/imbalance_after", "relibra/plan_ms",
                          "relibra/replicas", "relibra/moved_experts", "relibra/fallbacks"}
        assert m["relibra/fallbacks"] == [0.0]
        assert m["relibra/imbalance_after"][0] <= m["relibra/imbalance_before"][0]
    assert any(m["relibra/replicas"][0] > 0 for m in res["on"]["metrics"])


def test_tensor_parallel_split_counts_each_replayed_row_once():
    """With TP 2, verl packs each sequence to a multiple of 2 and splits the rows over the TP ranks: the
    ranks' rows together are every replayed row exactly once, and the pad rows are unknown (-1)."""
    import _engine_harness

    from relibra_verl.runtime.launch import spawn_ranks

    r0, r1 = spawn_ranks(_engine_harness.packed_rows_tp2, 2, timeout=120)
    lens = r0["lens"]
    padded = [n + n % 2 for n in lens]
    assert len(r0["rows"]) == len(r1["rows"]) == sum(padded) // 2
    rows = np.concatenate([r0["rows"], r1["rows"]])
    starts = np.cumsum([0] + padded[:-1])
    known = np.zeros(len(rows), bool)
    for s, n in zip(starts, lens):
        known[s:s + n - 1] = True                 # replayed: all but each sequence's last row
    assert (rows[known] >= 0).all() and (rows[~known] == -1).all()
