"""The rank side of `relibra-verl verify`: stock vs relibra on the same Megatron layers and routing.

`run_rank(rank, world, job)` builds `L` small real MoE layers (one per traced MoE layer), runs one
forward+backward with Megatron's static placement, patches the same layers in place, installs the plan,
runs again with identical inputs and replayed routing, and returns per-tensor differences and overheads.
The plan's reorder is then measured once more with optimizer state: fresh bf16 copies of the layers under
Megatron's DDP and DistributedOptimizer (Adam, fp32 main params), moments initialised by one step.
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
    experts = job.get("experts", "sequential")
    layers = [harness.build_moe_layer(topo.E, K, hidden=H, ffn=job["ffn"], dtype=dtype, seed=11 + l,
                                      experts=experts) for l in range(L)]
    xs = torch.as_tensor(np.random.default_rng(1000 + rank).standard_normal((L, T, 1, H)), dtype=dtype)
    ws = torch.as_tensor(np.random.default_rng(2000 + rank).standard_normal((L, T, 1, H)), dtype=torch.float32)
    if job.get("inject") and rank == 0:  # self-check of the comparison: one non-finite input value, both runs
        xs[0, 0, 0, 0] = float(job["inject"])
    stock_counts = np.zeros((L, topo.S), dtype=np.int64)  # tokens each stock expert computed (measured)

    def count_stock(l):
        def hook(module, args):
            stock_counts[l] += np.asarray(args[1].tolist() if torch.is_tensor(args[1]) else args[1], dtype=np.int64)
        return hook

    hooks = [lay.experts.register_forward_pre_hook(count_stock(l)) for l, lay in enumerate(layers)]

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
    for h in hooks:
        h.remove()
    ref.update(weight_grads())
    rt = RelibraRuntime(topo, kernels=job.get("kernels", "auto"), prefetch=job.get("prefetch", True))
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
    nonfinite = sorted(k for k in ref if not (torch.isfinite(ref[k].float()).all()
                                             and torch.isfinite(got[k].float()).all()))
    executed = rt.executed_tokens()[0]  # [L, G, S+R] every rank's slots (collective)
    stock = [None] * world
    torch.distributed.all_gather_object(stock, stock_counts)
    m = rt.metrics
    return {"diffs": d, "nonfinite": nonfinite, "executed": executed, "stock_executed": np.stack(stock, axis=1),
            "permute_calls": dict(m.permute_calls), "grad_returns_async": m.grad_returns_async, "replica_sync_bytes": m.replica_sync_bytes, "grad_reduce_bytes": m.grad_reduce_bytes,
            "pool_bytes": m.pool_bytes, "migration_weight_bytes": migration, "peak_send_bytes": m.peak_send_bytes,
            "fetches_ahead": m.fetches_ahead, "fetches_blocking": m.fetches_blocking,
            "fetches_reused": m.fetches_reused, "seconds_stock": t_stock, "seconds_relibra": t_relibra,
            "migration": _optimizer_migration(topo, plan, L, K, H, job["ffn"], experts)}


def _optimizer_migration(topo, plan, L: int, K: int, H: int, ffn: int, experts: str = "sequential") -> dict:
    """Bytes this rank receives (by kind) and seconds for the plan's reorder with Megatron's
    DistributedOptimizer state: bf16 weights, fp32 main params, Adam exp_avg / exp_avg_sq."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import MegatronModule

    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime
    from relibra_verl.runtime.reorder import apply_placement

    class Stack(MegatronModule):  # one model chunk holding every layer, as DDP expects
        def __init__(self, layers):
            super().__init__(layers[0].config)
            self.layers = torch.nn.ModuleList(layers)

    layers = [harness.build_moe_layer(topo.E, K, hidden=H, ffn=ffn, dtype=torch.bfloat16, seed=11 + l,
                                      experts=experts) for l in range(L)]
    rt = RelibraRuntime(topo)
    for l, lay in enumerate(layers):
        rt.patch_layer(lay, l)
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(layers[0].config, ddp_cfg, Stack(layers))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16,
                                                 use_distributed_optimizer=True), [model])
    model.zero_grad_buffer()
    opt.step()  # zero gradients: creates the Adam moments, as after any real step
    dist.barrier()
    t0 = time.perf_counter()
    received = apply_placement(rt, plan.expert_at_home, opt)
    seconds = time.perf_counter() - t0
    return {"bytes": received, "by_kind": dict(rt.metrics.migration_bytes_by_kind), "seconds": seconds,
            "optimizer": [type(o).__name__ for o in opt.chained_optimizers]}
