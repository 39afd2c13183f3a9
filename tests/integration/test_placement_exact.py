"""Which DP rank holds which sequence of a mini-batch does not change the update: verl normalises the loss
by the mini-batch's global token count (MegatronEngine.forward_backward_batch all-reduces it over DP), so
moving sequences between ranks (relibra's routing-aware data placement) leaves the loss and the gradients
equal up to floating-point order. Two placements on verl's real engine path, EP 2 on gloo."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def runs():
    import _placement_harness

    from relibra_verl.runtime.launch import spawn_ranks

    return spawn_ranks(_placement_harness.run, 2, timeout=300)


@pytest.mark.parametrize("relibra", ["off", "on"])
def test_two_placements_give_equal_losses_and_updates(runs, relibra):
    verl_, moved = [[r[(relibra, p)] for r in runs] for p in ("verl", "moved")]
    # the ranks hold different sequences, so their shares of the loss differ ...
    assert not np.allclose(verl_[0]["losses"], moved[0]["losses"])
    # ... the mini-batch's loss (the sum over ranks) does not, at the first step and after the update
    total = lambda rs: np.sum([r["losses"] for r in rs], axis=0)  # noqa: E731
    np.testing.assert_allclose(total(moved), total(verl_), rtol=1e-5, atol=1e-6)
    assert total(verl_)[0] != total(verl_)[1]                           # the update changed the model
    # the updated expert weights (canonical names and order, as exported to the rollout) are equal
    for rank in range(2):
        a, b = verl_[rank]["export"], moved[rank]["export"]
        assert sorted(a) == sorted(b) and a
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank} {name}")
