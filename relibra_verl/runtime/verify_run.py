"""The rank side of `relibra-verl verify`: stock vs relibra on the same Megatron layers and routing.

`run_rank(rank, world, job)` builds `L` small real MoE layers (one per traced MoE layer), runs one
forward+backward with Megatron's static placement, patches the same layers in place, installs the plan,
runs again with identical inputs and replayed routing, and returns per-tensor differences and overheads.
"""
from __future__ import annotations

import time

import numpy as np
import torch


def run_rank(rank: int, world: int, job: dict) -> dict:
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime
    from relibra_verl.runtime.reorder import apply_placement, canonical_order

    harness.init_megatron(world)
    dtype = getattr(torch, job["dtype"])
    topo, plan = job["topo"], job["plan"]
    ids = torch.as_tensor(job["ids"][rank])  # [T, L, K] this rank's tokens
    T, L, K = ids.shape
    H = job["hidden"]
    layers = [harness.build_moe_layer(topo.E, K, hidden=H, ffn=job["ffn"], dtype=dtype, seed=11 + l)
              for l in range(L)]
    xs = torch.as_tensor(np.random.default_rng(1000 + rank).standard_normal((L, T, 1, H)), dtype=dtype)
    ws = torch.as_tensor(np.random.default_rng(2000 + rank).standard_normal((L, T, 1, H)), dtype=torch.float32)

    def step():
        for lay in layers:
            for p in lay.parameters():
                p.grad = None
            harness.replay(lay, ids[:, layers.index(lay)])
        x = xs.clone().requires_grad_()
        outs = [lay(x[l])[0] for l, lay in enumerate(layers)]
        sum((o.float() * ws[l]).sum() for l, o in enumerate(outs)).backward()
        res = {}
        for l, o in enumerate(outs):
            res[f"layer{l}.output"] = o.detach().clone()
            res[f"layer{l}.input_grad"] = x.grad[l].clone()
        return res

    def weight_grads():
        res = {}
        for l, lay in enumerate(layers):
            for n, p in lay.named_parameters():
                kind = "router_grad" if n.startswith("router") else "expert_grad"
                res[f"layer{l}.{kind}.{n}"] = p.grad.detach().clone()
        return res

    t0 = time.perf_counter()
    ref = step()
    t_stock = time.perf_counter() - t0
    ref.update(weight_grads())
    rt = RelibraRuntime(topo, kernels=job.get("kernels", "auto"))
    for l, lay in enumerate(layers):
        rt.patch_layer(lay, l)
    migration = apply_placement(rt, plan.expert_at_home)  # the plan's reordering: move expert weights
    rt.set_plan(plan)
    rt.set_micro_batch(0)
    t0 = time.perf_counter()
    got = step()
    t_relibra = time.perf_counter() - t0
    with canonical_order(rt, grads=True):  # compare expert gradients in canonical expert order
        got.update(weight_grads())
    d = harness.diffs(ref, got)
    m = rt.metrics
    return {"diffs": d, "replica_sync_bytes": m.replica_sync_bytes, "grad_reduce_bytes": m.grad_reduce_bytes,
            "pool_bytes": m.pool_bytes, "migration_bytes": migration, "peak_send_bytes": m.peak_send_bytes,
            "seconds_stock": t_stock, "seconds_relibra": t_relibra}
