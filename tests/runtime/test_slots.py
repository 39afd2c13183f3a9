"""The plain-torch slot assignment rule against a loop over pairs (no process groups)."""
from __future__ import annotations

import numpy as np
import torch

from relibra_verl.planner.types import Topology
from relibra_verl.runtime import harness
from relibra_verl.runtime.slots import physical_routing


def _loop(routing, copy_slot, quota):
    T, E = routing.shape
    seen = np.zeros(E, dtype=np.int64)
    out = {}
    for t in range(T):
        for e in np.flatnonzero(routing[t]):
            i, acc, slot = seen[e], 0, copy_slot[e, 0]
            for c in range(1, copy_slot.shape[1]):
                if acc <= i < acc + quota[e, c]:
                    slot = copy_slot[e, c]
                    break
                acc += quota[e, c]
            out[(t, e)] = slot
            seen[e] += 1
    return out


def test_rule_matches_loop_on_random_plans():
    rng = np.random.default_rng(0)
    for trial in range(20):
        topo = Topology(num_experts=8, ep_size=4, gpus_per_node=2, replica_slots=int(rng.integers(0, 3)))
        T, K = int(rng.integers(0, 30)), 2
        ids = np.stack([rng.permutation(8)[:K] for _ in range(T)]) if T else np.zeros((0, K), dtype=np.int64)
        routing = np.zeros((T, 8), dtype=bool)
        np.put_along_axis(routing, ids, True, axis=1) if T else None
        counts = np.zeros((1, 1, 4, 8), dtype=np.int64)
        counts[0, 0, 1] = routing.sum(0)
        plan = harness.random_plan(topo, counts, rng)
        cs, q = plan.copy_tables(0, 0, 1)
        probs = torch.rand(T, 8) * torch.as_tensor(routing)
        phys, pp = physical_routing(torch.as_tensor(routing), probs, torch.as_tensor(cs), torch.as_tensor(q),
                                    topo.G * (topo.S + topo.R), kernels="torch")
        want = _loop(routing, cs, q)
        assert phys.sum().item() == routing.sum()  # every pair exactly once
        for (t, e), slot in want.items():
            assert phys[t, slot] and pp[t, slot] == probs[t, e]


def test_kernels_auto_matches_torch_rule():
    kernels = __import__("pytest").importorskip("relibra_verl.kernels")
    assert hasattr(kernels, "assign_slots")
    rng = np.random.default_rng(1)
    topo = Topology(num_experts=8, ep_size=4, gpus_per_node=2, replica_slots=2)
    T = 25
    routing = np.zeros((T, 8), dtype=bool)
    for t in range(T):
        routing[t, rng.permutation(8)[: int(rng.integers(0, 3))]] = True  # masked/padded rows too
    counts = np.zeros((1, 1, 4, 8), dtype=np.int64)
    counts[0, 0, 2] = routing.sum(0)
    plan = harness.random_plan(topo, counts, rng)
    cs, q = (torch.as_tensor(a) for a in plan.copy_tables(0, 0, 2))
    probs = torch.rand(T, 8)
    a = physical_routing(torch.as_tensor(routing), probs, cs, q, 16, kernels="torch")
    b = physical_routing(torch.as_tensor(routing), probs, cs, q, 16, kernels="auto")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
