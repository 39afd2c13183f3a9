"""Synthetic verl V1 mini-batches (jagged TensorDicts as verl's trainer hands them to the engine)."""
from __future__ import annotations

import numpy as np
import torch


def v1_batch(seed: int, num_seqs: int, num_experts: int, topk: int, num_layers: int, *, max_len: int = 12,
             max_token_len: int = 24, with_routes: bool = True, skew: float = 0.0, hot: list | None = None):
    """A TensorDict with jagged input_ids / response_mask / loss_mask / routed_experts (int16, one row short).
    skew: expert e is routed with weight exp(-skew * e), or exp(-skew * i) for e = hot[i] (the rest 0)."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(4, max_len + 1, (num_seqs,), generator=g).tolist()
    resp = [int(torch.randint(1, n, (1,), generator=g)) for n in lens]
    nt = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    ids = [torch.randint(0, 32, (n,), generator=g) for n in lens]
    rm = [torch.ones(r, dtype=torch.int64) for r in resp]
    lm = [torch.cat([torch.zeros(n - r), torch.ones(r)]).long() for n, r in zip(lens, resp)]
    fields = {"input_ids": nt(ids), "response_mask": nt(rm), "loss_mask": nt(lm)}
    if with_routes:
        w = np.exp(-skew * np.arange(num_experts))
        if hot is not None:
            w = np.zeros(num_experts)
            w[hot] = np.exp(-skew * np.arange(len(hot)))
        w /= w.sum()
        rng = np.random.default_rng(seed)
        routes = []
        for n in lens:
            r = np.stack([[rng.choice(num_experts, size=topk, replace=False, p=w) for _ in range(num_layers)]
                          for _ in range(n - 1)]).astype(np.int16)
            routes.append(torch.from_numpy(r))
        fields["routed_experts"] = nt(routes)
    return tu.get_tensordict(fields, non_tensor_dict={"use_dynamic_bsz": True, "max_token_len_per_gpu": max_token_len,
                                                     "enable_routing_replay": True})
