"""Executed balance: the tokens each physical slot of this rank actually computed.

The experts module of every patched layer adds its `tokens_per_expert` (the S home + R replica slots it is
about to compute) to a device tensor per (micro-batch, layer): an add on the tensor's own device, so the
forward gains no host sync. `read` copies everything to the host once, at step end. What was *planned*
(`BatchPlan` quotas replayed on the routes) and what *ran* can then be compared: a replica whose tokens
silently went home shows up as a slot that computed nothing.
"""
from __future__ import annotations

import numpy as np
import torch


class ExecutedCounts:
    """{(micro-batch, layer): [S+R] int64 tensor on the experts' device}, reset with each new plan."""

    def __init__(self):
        self._counts: dict = {}

    def reset(self) -> None:
        self._counts = {}

    def add(self, m: int, layer: int, tokens_per_slot) -> None:
        """tokens_per_slot: [S+R] this rank's slots (tensor on any device, or a list); no host sync."""
        t = tokens_per_slot if torch.is_tensor(tokens_per_slot) else torch.as_tensor(tokens_per_slot)
        acc = self._counts.get((m, layer))
        if acc is None:
            self._counts[(m, layer)] = t.detach().to(torch.int64, copy=True)
        else:
            acc.add_(t.detach().to(acc.device, torch.int64))

    def read(self, num_layers: int, num_slots: int) -> np.ndarray:
        """[M, L, S+R] on the host (one device-to-host copy); M = highest micro-batch seen + 1."""
        if not self._counts:
            return np.zeros((0, num_layers, num_slots), dtype=np.int64)
        keys = sorted(self._counts)
        host = torch.stack([self._counts[k] for k in keys]).cpu().numpy()
        out = np.zeros((max(m for m, _ in keys) + 1, num_layers, num_slots), dtype=np.int64)
        for (m, l), row in zip(keys, host):
            out[m, l] = row
        return out


def planned_tokens(topo, plan, routes_by_rank, m: int = 0) -> np.ndarray:
    """Tokens the plan sends to each physical slot [L, G, S+R] for micro-batch m, given every source rank's
    routes (list over ranks of [T, L, K] int arrays): the runtime's own assignment rule replayed on the host."""
    import torch as _t

    from relibra_verl.runtime.slots import physical_routing

    G, S, R, E = topo.G, topo.S, topo.R, topo.E
    L = routes_by_rank[0].shape[1]
    out = np.zeros((L, G, S + R), dtype=np.int64)
    for r, ids in enumerate(routes_by_rank):
        for l in range(L):
            routes = _t.as_tensor(np.asarray(ids)[:, l]).long()
            rmap = _t.zeros((routes.shape[0], E), dtype=_t.bool)
            rmap.scatter_(1, routes, True)
            cs, q = plan.copy_tables(m, l, r)
            phys, _ = physical_routing(rmap, rmap.float(), _t.from_numpy(cs), _t.from_numpy(q), G * (S + R),
                                       kernels="torch")
            out[l] += phys.sum(0).reshape(G, S + R).numpy()
    return out
