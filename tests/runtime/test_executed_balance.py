"""Executed balance: the runtime counts the tokens each physical slot computed (on device, read at step end),
and those counts, not the plan recomputed, are what balance is judged by. A runtime that silently computes
planned replica tokens at home stays exact, so only the measured counts can catch it. 4 gloo ranks."""
from __future__ import annotations

import numpy as np
import pytest
from test_dispatch_exact import FP32_TOL, _case, _max_rel

S = 2


@pytest.mark.parametrize("name", ["random_r2_s0", "grouped_random_r2_s0", "triton_permute", "adversarial"])
def test_measured_tokens_equal_the_plan(megatron_suite, name):
    res = _case(megatron_suite, name)
    executed = np.asarray(res[0]["executed"])  # [M=1, L=1, G, S+R]
    planned = np.asarray(res[0]["planned"])    # [L=1, G, S+R]
    assert all(np.array_equal(np.asarray(x["executed"]), executed) for x in res)  # one all-gathered view
    assert np.array_equal(executed[0], planned)
    assert executed[0, 0, :, S:].sum() > 0                               # replicas computed tokens
    assert executed[0, 0].sum(1).tolist() == res[0]["after"]             # per rank, as the plan's balance says


@pytest.mark.parametrize("name", ["silent_home", "grouped_silent_home"])
def test_replica_tokens_silently_going_home_fail_the_check(megatron_suite, name):
    res = _case(megatron_suite, name)
    assert _max_rel(res) <= FP32_TOL  # exactness cannot see it ...
    executed = np.asarray(res[0]["executed"])[0]
    planned = np.asarray(res[0]["planned"])
    assert planned[:, :, S:].sum() > 0 and executed[:, :, S:].sum() == 0
    assert not np.array_equal(executed, planned)  # ... the measured counts do
    assert executed.sum(2).tolist()[0] == res[0]["before"]  # Megatron's static balance, not the plan's
