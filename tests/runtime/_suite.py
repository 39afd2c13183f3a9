"""Cases run inside 4 gloo ranks (EP 4 = 2 nodes x 2). Each returns plain data; the tests assert on it.

Every rank runs every case in the same order; a case that raises records its error and the next case runs
(errors are raised identically on every rank after an agreed collective, so the group stays in step).
"""
from __future__ import annotations

import numpy as np
import torch

E, K, T, H, FFN = 8, 2, 12, 16, 8


def _ids(rng: np.random.Generator, world: int, skew: str | None = None) -> list[torch.Tensor]:
    out = []
    for r in range(world):
        rows = []
        for _ in range(T):
            if skew == "one" or (skew == "half" and r < world // 2):
                rest = 1 + rng.permutation(E - 1)[: K - 1]
                rows.append(np.concatenate([[0], rest]))
            else:
                rows.append(rng.permutation(E)[:K])
        out.append(torch.as_tensor(np.stack(rows), dtype=torch.long))
    return out


def _counts(ids: list[torch.Tensor], M: int = 1, L: int = 1) -> np.ndarray:
    c = np.zeros((M, L, len(ids), E), dtype=np.int64)
    for r, i in enumerate(ids):
        np.add.at(c[0, 0, r], i.reshape(-1).numpy(), 1)
    return c


def _compare(rank, world, *, R, plan_fn, skew=None, dtype=torch.float32, seed=0, rt_kwargs=None,
             experts="sequential", fusion=False, silent_home=False):
    from relibra_verl.planner.types import Topology
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime

    rng = np.random.default_rng(seed)
    ids = _ids(rng, world, skew)
    topo = Topology(num_experts=E, ep_size=world, gpus_per_node=2, replica_slots=R)
    layer = harness.build_moe_layer(E, K, hidden=H, ffn=FFN, dtype=dtype, seed=seed, experts=experts)
    x = torch.as_tensor(np.random.default_rng(1000 + rank).standard_normal((T, 1, H)), dtype=dtype)
    w = torch.as_tensor(np.random.default_rng(2000 + rank).standard_normal((T, 1, H)), dtype=torch.float32)
    ref = harness.fwd_bwd(layer, x, ids[rank], w)
    layer.config.moe_permute_fusion = fusion  # the stock run above cannot fuse without Transformer Engine
    rt = RelibraRuntime(topo, **(rt_kwargs or {}))
    rt.patch_layer(layer, 0)
    plan = plan_fn(topo, _counts(ids), rng, rank)
    rt.set_plan(plan)
    rt.set_micro_batch(0)
    calls: list = []  # groups of each grouped-GEMM call (fc1) while relibra runs
    hook = (layer.experts.linear_fc1.register_forward_pre_hook(lambda mod, args: calls.append(len(args[1])))
            if experts == "grouped" else None)
    import relibra_verl.runtime.moe as moe_mod

    widen = moe_mod.physical_routing
    if silent_home:  # a runtime bug: replica quotas ignored, every pair computed at home (still exact)
        moe_mod.physical_routing = lambda rmap, probs, cs, q, *a, **k: widen(rmap, probs, cs, torch.zeros_like(q),
                                                                            *a, **k)
    try:
        got = harness.fwd_bwd(layer, x, ids[rank], w)
    finally:
        moe_mod.physical_routing = widen
    if hook is not None:
        hook.remove()
    d = harness.diffs(ref, got)
    from relibra_verl.runtime.executed import planned_tokens

    executed = rt.executed_tokens()
    planned = planned_tokens(topo, plan, [i.numpy()[:, None] for i in ids]) if plan is not None else None
    before = harness.tokens_per_rank(topo, None, ids)
    after = harness.tokens_per_rank(topo, plan, ids) if plan is not None else before
    return {"diffs": d, "before": before.tolist(), "after": after.tolist(),
            "sync_bytes": rt.metrics.replica_sync_bytes, "grad_bytes": rt.metrics.grad_reduce_bytes,
            "pool_bytes": rt.metrics.pool_bytes, "fallback": rt.metrics.fallback_micro_batches,
            "fc1_calls": calls, "has_replicas": bool(plan is not None and (plan.replica_expert >= 0).any()),
            "grad_async": rt.metrics.grad_returns_async, "permute_calls": dict(rt.metrics.permute_calls),
            "executed": executed.tolist(), "planned": None if planned is None else planned.tolist()}


def _interpreted(fn):
    """Run a case with Triton's interpreter on (CPU tensors)."""
    import os

    def run(*a, **k):
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            return fn(*a, **k)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET")
            else:
                os.environ["TRITON_INTERPRET"] = old
    return run


def _random(topo, counts, rng, rank):
    from relibra_verl.runtime import harness

    return harness.random_plan(topo, counts, rng)


def _adversarial(topo, counts, rng, rank):
    """Every token to expert 0: replicas of expert 0 on rank 1 (node 0), quotas = all pairs of each source."""
    from relibra_verl.runtime import harness

    plan = harness.random_plan(topo, counts * 0, rng)
    plan.replica_expert[:] = -1
    plan.replica_quota[:] = 0
    plan.replica_expert[0, 0, 1, 0] = 0
    plan.replica_quota[0, 0, 1, 0, :] = counts[0, 0, :, 0] // 2
    return plan


def _mismatched(topo, counts, rng, rank):
    """A plan made for other loads (random counts): balance may suffer, tokens never."""
    from relibra_verl.runtime import harness

    fake = np.random.default_rng(99).integers(0, 30, size=counts.shape)
    return harness.random_plan(topo, fake, np.random.default_rng(5))


def _none(topo, counts, rng, rank):
    return None


def _other_E(topo, counts, rng, rank):
    from relibra_verl.planner.types import Topology
    from relibra_verl.runtime import harness

    t2 = Topology(num_experts=2 * E, ep_size=topo.G, gpus_per_node=2, replica_slots=topo.R)
    return harness.random_plan(t2, np.zeros((1, 1, topo.G, 2 * E), dtype=np.int64), rng)


def _off_node(topo, counts, rng, rank):
    from relibra_verl.runtime import harness

    plan = harness.random_plan(topo, counts, rng)
    plan.replica_expert[0, 0, 0, :] = -1
    plan.replica_quota[0, 0, 0] = 0
    plan.replica_expert[0, 0, 0, 0] = E - 1  # home rank 3, node 1; rank 0 is on node 0
    return plan


def _diverging(topo, counts, rng, rank):
    from relibra_verl.runtime import harness

    plan = harness.random_plan(topo, counts, np.random.default_rng(11))
    if rank == 2:
        plan.replica_quota[plan.replica_expert >= 0] += 1  # a nondeterministic planner
    return plan


def _two_layers(rank, world, *, R, seed=3, L=2, prefetch=True, sparse=False, recompute=False,
                experts="sequential", events=False):
    """L MoE layers in a row, two micro-batches with different plans: the replica pool is shared by the layers
    (double-buffered with prefetch: send-ahead in forward and backward, reuse of the last two layers' weights).
    sparse: layer 1 has replicas on node 0 only and layer 2 none at all, so some ranks and whole nodes post
    no transfer for a layer (must not hang, must stay exact). recompute: MoE-layer recompute (the recompute
    runs inside the backward, so its send-ahead goes to layer l-1)."""
    from relibra_verl.planner.types import Topology
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime

    rng = np.random.default_rng(seed)
    topo = Topology(num_experts=E, ep_size=world, gpus_per_node=2, replica_slots=R)
    extra = dict(recompute_granularity="selective", recompute_modules=["moe"]) if recompute else {}
    layers = [harness.build_moe_layer(E, K, hidden=H, ffn=FFN, seed=seed + i, experts=experts, **extra)
              for i in range(L)]
    ids = [[_ids(rng, world, "half") for _ in range(L)] for _ in range(2)]  # [mb][layer][rank]
    xs = [torch.as_tensor(np.random.default_rng(3000 + 10 * m + rank).standard_normal((T, 1, H)),
                          dtype=torch.float32) for m in range(2)]

    def run():
        outs = []
        for p in (q for lay in layers for q in lay.parameters()):
            p.grad = None
        for m in range(2):
            if rt is not None:
                rt.set_micro_batch(m)
            for li, lay in enumerate(layers):
                harness.replay(lay, ids[m][li][rank])
            x = xs[m].clone().requires_grad_()
            y = x
            for lay in layers:
                y, _ = lay(y)
            (y * y).sum().backward()
            outs.append(y.detach().clone())
            outs.append(x.grad.clone())
        outs += [p.grad.clone() for lay in layers for p in lay.parameters()]
        return outs

    rt = None
    ref = run()
    rt = RelibraRuntime(topo, prefetch=prefetch)
    if events:
        rt.events = []
    for i, lay in enumerate(layers):
        rt.patch_layer(lay, i)
    counts = np.zeros((2, L, world, E), dtype=np.int64)
    for m in range(2):
        for li in range(L):
            for r in range(world):
                np.add.at(counts[m, li, r], ids[m][li][r].reshape(-1).numpy(), 1)
    plan = harness.random_plan(topo, counts, rng, num_layers=L)
    if sparse:
        plan.replica_expert[:, 1, 2:] = -1  # node 1 (ranks 2, 3): no replica in layer 1
        plan.replica_quota[:, 1, 2:] = 0
        plan.replica_expert[:, 2] = -1      # layer 2: no replica anywhere
        plan.replica_quota[:, 2] = 0
    rt.set_plan(plan)
    got = run()
    m = rt.metrics
    return {"max_rel": harness.max_rel(zip(ref, got)), "sync_bytes": m.replica_sync_bytes,
            "pool_bytes": m.pool_bytes, "ahead": m.fetches_ahead, "blocking": m.fetches_blocking,
            "reused": m.fetches_reused, "numel_bytes": rt.layers[0].numel * 4, "events": rt.events,
            "grad_async": m.grad_returns_async, "grad_blocking": m.grad_returns_blocking,
            "grad_bytes": m.grad_reduce_bytes}


CASES = {
    "random_r2_s0": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", seed=0),
    "random_r2_s1": lambda r, w: _compare(r, w, R=2, plan_fn=_random, seed=1),
    "random_r1_s2": lambda r, w: _compare(r, w, R=1, plan_fn=_random, skew="half", seed=2),
    "adversarial": lambda r, w: _compare(r, w, R=1, plan_fn=_adversarial, skew="one", seed=4),
    "mismatched": lambda r, w: _compare(r, w, R=2, plan_fn=_mismatched, skew="half", seed=5),
    "r0": lambda r, w: _compare(r, w, R=0, plan_fn=_random, skew="half", seed=6),
    "no_plan": lambda r, w: _compare(r, w, R=2, plan_fn=_none, skew="half", seed=7),
    "bf16": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", dtype=torch.bfloat16, seed=8),
    "two_layers": lambda r, w: _two_layers(r, w, R=2),
    "two_layers_no_prefetch": lambda r, w: _two_layers(r, w, R=2, prefetch=False),
    "four_layers_sparse": lambda r, w: _two_layers(r, w, R=2, L=4, sparse=True, seed=13),
    "three_layers_recompute": lambda r, w: _two_layers(r, w, R=2, L=3, recompute=True, seed=17),
    "random_r2_no_prefetch": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", seed=0,
                                                   rt_kwargs={"prefetch": False}),
    "bad_other_E": lambda r, w: _compare(r, w, R=2, plan_fn=_other_E, seed=9),
    "bad_off_node": lambda r, w: _compare(r, w, R=2, plan_fn=_off_node, seed=10),
    "bad_diverging": lambda r, w: _compare(r, w, R=2, plan_fn=_diverging, seed=12),
    "grouped_random_r2_s0": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", seed=0, experts="grouped"),
    "grouped_random_r1_s2": lambda r, w: _compare(r, w, R=1, plan_fn=_random, skew="half", seed=2, experts="grouped"),
    "grouped_adversarial": lambda r, w: _compare(r, w, R=1, plan_fn=_adversarial, skew="one", seed=4,
                                                 experts="grouped"),
    "grouped_no_plan": lambda r, w: _compare(r, w, R=2, plan_fn=_none, skew="half", seed=7, experts="grouped"),
    "grouped_bf16": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", dtype=torch.bfloat16, seed=8,
                                          experts="grouped"),
    "grouped_three_layers": lambda r, w: _two_layers(r, w, R=2, L=3, experts="grouped", events=True),
    "three_layers_events": lambda r, w: _two_layers(r, w, R=2, L=3, events=True),
    "grouped_two_layers_no_prefetch": lambda r, w: _two_layers(r, w, R=2, prefetch=False, experts="grouped"),
    "grouped_four_layers_sparse": lambda r, w: _two_layers(r, w, R=2, L=4, sparse=True, seed=13, experts="grouped"),
    "grouped_three_layers_recompute": lambda r, w: _two_layers(r, w, R=2, L=3, recompute=True, seed=17,
                                                               experts="grouped"),
    "triton_permute": lambda r, w: _interpreted(_compare)(r, w, R=2, plan_fn=_random, skew="half", seed=0,
                                                          rt_kwargs={"kernels": "triton"}),
    "grouped_triton_permute": lambda r, w: _interpreted(_compare)(r, w, R=2, plan_fn=_random, skew="half", seed=1,
                                                                  rt_kwargs={"kernels": "triton"}, experts="grouped"),
    "fusion_asked_torch_reference": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", seed=2,
                                                          experts="grouped", fusion=True),
    "triton_without_interpreter": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", seed=0,
                                                        rt_kwargs={"kernels": "triton"}),
    "silent_home": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", seed=0, silent_home=True),
    "grouped_silent_home": lambda r, w: _compare(r, w, R=2, plan_fn=_random, skew="half", seed=0,
                                                 experts="grouped", silent_home=True),
    "extend_plan": lambda r, w: _extend(r, w, bad=False),
    "bad_extend_plan": lambda r, w: _extend(r, w, bad=True),
    "bad_extend_plan_one_rank_failed": lambda r, w: _extend(r, w, bad=False, failed_rank=1),
}


def _extend(rank, world, *, bad, failed_rank=None):
    """A mini-batch planned in two parts: micro-batch 0's plan, then (extend_plan) the whole. A whole whose
    first micro-batch differs from the installed one is refused on every rank; a rank that could not plan
    the rest (failed_rank) brings its error to the agreement and every rank raises it."""
    from relibra_verl.planner.types import BatchPlan, Topology
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime, RelibraRuntimeError

    rng = np.random.default_rng(31)
    topo = Topology(num_experts=E, ep_size=world, gpus_per_node=2, replica_slots=2)
    counts = rng.integers(1, 40, size=(2, 1, world, E))
    whole = harness.random_plan(topo, counts, rng)
    rt = RelibraRuntime(topo)
    rt.patch_layer(harness.build_moe_layer(E, K, hidden=H, ffn=FFN, seed=3), 0)
    rt.set_plan(BatchPlan(topo, whole.expert_at_home, whole.replica_expert[:1].copy(), whole.replica_quota[:1].copy(),
                          whole.moved_experts))
    rt.set_micro_batch(0)
    before = rt.tables(0)[1].clone()
    try:
        rt.set_micro_batch(1)
        outside = None
    except RelibraRuntimeError as exc:
        outside = str(exc)
    if bad:
        whole.replica_quota[0] += (whole.replica_expert[0] >= 0)[..., None]   # micro-batch 0 planned again, differently
    if rank == failed_rank:
        rt.extend_plan(None, error="MemoryError: the planner thread ran out of memory")
    else:
        rt.extend_plan(whole)
    rt.set_micro_batch(1)
    return {"outside": outside, "micro_batches": rt.plan.num_micro_batches, "micro_batch": rt.micro_batch,
            "tables_kept": bool(torch.equal(rt.tables(0, m=0)[1], before))}


def run_cases(rank: int, world: int, names: list[str]) -> dict:
    from relibra_verl.runtime import harness

    harness.init_megatron(world)
    out = {}
    for name in names:
        try:
            out[name] = CASES[name](rank, world)
        except Exception as exc:  # recorded; the tests check that every rank raised the same error
            import traceback

            out[name] = {"error": type(exc).__name__, "message": str(exc), "where": traceback.format_exc()[-1500:]}
    return out


def _reorder_steps(rank, world, *, R=1, steps=3, seed=21, dtype=torch.float32):
    """Three Adam steps with a new placement (weights + Adam state moved) before each == three plain steps;
    then a canonical-order checkpoint loads into a plain Megatron layer."""
    import os
    import tempfile

    import torch.distributed as dist

    from relibra_verl.planner.types import Topology
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime
    from relibra_verl.runtime.reorder import apply_placement, canonical_order

    rng = np.random.default_rng(seed)
    topo = Topology(num_experts=E, ep_size=world, gpus_per_node=2, replica_slots=R)
    ids = [_ids(rng, world, "half") for _ in range(steps)]
    xs = [torch.as_tensor(np.random.default_rng(4000 + 10 * s + rank).standard_normal((T, 1, H)), dtype=dtype)
          for s in range(steps)]
    w = torch.as_tensor(np.random.default_rng(5000 + rank).standard_normal((T, 1, H)), dtype=torch.float32)
    placements = [np.stack([rng.permutation(E)]) for _ in range(steps)]

    def train(relibra: bool):
        layer = harness.build_moe_layer(E, K, hidden=H, ffn=FFN, dtype=dtype, seed=seed)
        opt = torch.optim.Adam(list(layer.experts.parameters()), lr=1e-2)
        rt = None
        if relibra:
            rt = RelibraRuntime(topo)
            rt.patch_layer(layer, 0)
        losses = []
        for s in range(steps):
            if rt is not None:
                apply_placement(rt, placements[s], opt)
                plan = harness.random_plan(topo, _counts(ids[s]), np.random.default_rng(s), expert_at_home=placements[s])
                rt.set_plan(plan)
                rt.set_micro_batch(0)
            res = harness.fwd_bwd(layer, xs[s], ids[s][rank], w)
            loss = torch.tensor([(res["output"].float() * w).sum().item()], dtype=torch.float64)
            dist.all_reduce(loss)
            losses.append(loss.item())
            opt.step()
        return layer, opt, rt, losses

    ref_layer, ref_opt, _, ref_losses = train(False)
    layer, opt, rt, losses = train(True)
    ref_sd = {k: v.clone() for k, v in ref_layer.state_dict().items() if torch.is_tensor(v)}
    ref_state = [ref_opt.state[p]["exp_avg"].clone() for p in ref_layer.experts.parameters()]
    with canonical_order(rt, opt):
        sd = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
        state = [opt.state[p]["exp_avg"].clone() for p in layer.experts.parameters()]
        path = os.path.join(tempfile.mkdtemp(), f"ckpt{rank}.pt")
        torch.save(layer.state_dict(), path)
    placed = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    plain = harness.build_moe_layer(E, K, hidden=H, ffn=FFN, dtype=dtype, seed=seed + 1)  # other weights
    plain.load_state_dict(torch.load(path, weights_only=False))
    loaded = {k: v for k, v in plain.state_dict().items() if torch.is_tensor(v)}
    rel = lambda a, b: harness.diff(a, b)[1]  # noqa: E731 (inf on NaN/Inf)
    return {
        "ref_losses": ref_losses, "losses": losses,
        "weights_rel": max(rel(ref_sd[k], sd[k]) for k in ref_sd),
        "adam_rel": max(rel(a, b) for a, b in zip(ref_state, state)),
        "ckpt_rel": max(rel(ref_sd[k], loaded[k]) for k in ref_sd),
        "placed_differs": any(not torch.equal(sd[k], placed[k]) for k in sd if "local_experts" in k),
        "migration_bytes": rt.metrics.migration_bytes,
        "same_keys": sorted(sd) == sorted(ref_sd),
    }


CASES["reorder_steps"] = lambda r, w: _reorder_steps(r, w)


def _ddp_steps(rank, world, *, R=2, steps=3, seed=31, overlap=True, reorder=True, experts="sequential",
               attach=True):
    """Megatron DDP (overlap_grad_reduce: replica grads must reach main_grad before the bucket is reduced),
    2 micro-batches with different plans, reordering before each step, torch Adam fed from main_grad
    (Megatron's own DistributedOptimizer: `_distopt_steps`): 3 steps equal stock."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from relibra_verl.planner.types import Topology
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime
    from relibra_verl.runtime.reorder import canonical_order

    rng = np.random.default_rng(seed)
    topo = Topology(num_experts=E, ep_size=world, gpus_per_node=2, replica_slots=R)
    ids = [[_ids(rng, world, "half") for _ in range(2)] for _ in range(steps)]  # [step][micro-batch][rank]
    xs = [[torch.as_tensor(np.random.default_rng(6000 + 100 * s + 10 * m + rank).standard_normal((T, 1, H)),
                           dtype=torch.float32) for m in range(2)] for s in range(steps)]
    w = torch.as_tensor(np.random.default_rng(7000 + rank).standard_normal((T, 1, H)), dtype=torch.float32)
    placements = [np.stack([rng.permutation(E) if reorder else np.arange(E)]) for _ in range(steps)]

    def train(relibra: bool):
        layer = harness.build_moe_layer(E, K, hidden=H, ffn=FFN, seed=seed, experts=experts)
        rt = None
        if relibra:
            rt = RelibraRuntime(topo)
            rt.patch_layer(layer, 0)
            rt.events = []
        ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=False, overlap_grad_reduce=overlap,
                                                bucket_size=None)
        model = DistributedDataParallel(layer.config, ddp_cfg, layer)
        if rt is not None and attach:
            rt.attach_ddp(model)
        opt = torch.optim.Adam(list(layer.parameters()), lr=1e-2)
        losses = []
        for s in range(steps):
            loss = _train_step_forward_backward(model, layer, rt, opt, topo, placements[s], ids[s], xs[s], w, rank, s)
            model.finish_grad_sync()
            for p in layer.parameters():
                p.grad = p.main_grad.clone()
            opt.step()
            dist.all_reduce(loss)
            losses.append(loss.item())
        return layer, opt, rt, losses

    ref_layer, _, _, ref_losses = train(False)
    layer, opt, rt, losses = train(True)
    ref_sd = {k: v.clone() for k, v in ref_layer.state_dict().items() if torch.is_tensor(v)}
    with canonical_order(rt, opt):
        sd = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    rel = lambda a, b: harness.diff(a, b)[1]  # noqa: E731 (inf on NaN/Inf)
    return {"ref_losses": ref_losses, "losses": losses, "weights_rel": max(rel(ref_sd[k], sd[k]) for k in ref_sd),
            "sync_bytes": rt.metrics.replica_sync_bytes, "grad_async": rt.metrics.grad_returns_async,
            "grad_blocking": rt.metrics.grad_returns_blocking}


CASES["ddp_steps"] = lambda r, w: _ddp_steps(r, w)
CASES["grouped_ddp_steps"] = lambda r, w: _ddp_steps(r, w, experts="grouped")
CASES["grouped_ddp_steps_unattached"] = lambda r, w: _ddp_steps(r, w, experts="grouped", attach=False)


def _recompute(rank, world, *, R=2, seed=41, prefetch=True):
    """MoE-layer recompute, two micro-batches forwarded before either backward (pipeline order), each with
    its own plan: the recompute must use each micro-batch's plan (and RouterReplay its routing)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from relibra_verl.planner.types import Topology
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime

    rng = np.random.default_rng(seed)
    topo = Topology(num_experts=E, ep_size=world, gpus_per_node=2, replica_slots=R)
    ids = [_ids(rng, world, "half") for _ in range(2)]
    xs = [torch.as_tensor(np.random.default_rng(8000 + 10 * m + rank).standard_normal((T, 1, H)),
                          dtype=torch.float32) for m in range(2)]
    layer = harness.build_moe_layer(E, K, hidden=H, ffn=FFN, seed=seed, recompute_granularity="selective",
                                    recompute_modules=["moe"])
    assert layer.moe_layer_recompute

    def run(rt):
        for p in layer.parameters():
            p.grad = None
        rr = layer.router.router_replay
        rr.clear_indices()
        rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        losses, xg = [], []
        for m in range(2):
            if rt is not None:
                rt.set_micro_batch(m)
            rr.set_target_indices(ids[m][rank])
            x = xs[m].clone().requires_grad_()
            out, _ = layer(x)
            losses.append(((out * out).sum(), x))
        rr.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
        if rt is not None:
            rt.set_micro_batch(1)  # a stale current micro-batch must not matter
        for loss, x in losses:
            loss.backward()
            xg.append(x.grad.clone())
        return xg + [p.grad.clone() for p in layer.parameters()]

    ref = run(None)
    rt = RelibraRuntime(topo, prefetch=prefetch)
    rt.patch_layer(layer, 0)
    c = np.zeros((2, 1, world, E), dtype=np.int64)
    for m in range(2):
        c[m, 0] = _counts(ids[m])[0, 0]
    rt.set_plan(harness.random_plan(topo, c, rng))
    got = run(rt)
    rel = harness.max_rel(zip(ref, got))
    return {"max_rel": rel, "sync_bytes": rt.metrics.replica_sync_bytes}


CASES["recompute"] = lambda r, w: _recompute(r, w)
CASES["recompute_no_prefetch"] = lambda r, w: _recompute(r, w, prefetch=False)




def _megatron_distopt(layer, overlap: bool, bucket_size):
    """DDP-wrapped layer + Megatron's own DistributedOptimizer (Adam; bf16 params get fp32 main params)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                                            grad_reduce_in_fp32=True, bucket_size=bucket_size)
    model = DistributedDataParallel(layer.config, ddp_cfg, layer)
    bf16 = layer.config.params_dtype == torch.bfloat16
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-2, bf16=bf16, params_dtype=layer.config.params_dtype,
                              use_distributed_optimizer=True, clip_grad=1.0)
    return model, get_megatron_optimizer(opt_cfg, [model])


def _expert_opt_state(layer, opt) -> list[torch.Tensor]:
    """fp32 main params and Adam moments of the layer's expert params, in parameter order (cloned)."""
    out = []
    for p in layer.experts.parameters():
        for o in opt.chained_optimizers:
            if p in o.model_param_group_index_map:
                st = o._get_main_param_and_optimizer_states(p)
                out += [st[k].detach().clone() for k in ("param", "exp_avg", "exp_avg_sq")]
    return out


def _distopt_steps(rank, world, *, R, dtype, steps=3, seed=61, experts="sequential"):
    """The real Megatron DistributedOptimizer (Adam; bf16 params with fp32 main params, or fp32 params; EP 4 =
    2 x 2, expert DP 1) under DDP with overlap and small buckets, 2 micro-batches per step, a new placement
    before each step: 3 steps equal 3 plain steps (losses, canonical weights, main params, Adam moments); a
    checkpoint (model + optimizer state_dict + dp-zero parameter state) saved after reordering equals the plain
    run's and loads into a plain Megatron layer + optimizer.
    With R = 0 the arithmetic is the stock one (bitwise); replicas split an expert's weight-gradient GEMM, so
    with R > 0 fp32 is the exact check (bf16 partial gradients round differently, and Adam amplifies that)."""
    import os
    import tempfile

    import torch.distributed as dist

    from relibra_verl.planner.types import Topology
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.moe import RelibraRuntime
    from relibra_verl.runtime.reorder import canonical_order

    rng = np.random.default_rng(seed)
    topo = Topology(num_experts=E, ep_size=world, gpus_per_node=2, replica_slots=R)
    ids = [[_ids(rng, world, "half") for _ in range(2)] for _ in range(steps)]
    xs = [[torch.as_tensor(np.random.default_rng(10000 + 100 * s + 10 * m + rank).standard_normal((T, 1, H)),
                           dtype=dtype) for m in range(2)] for s in range(steps)]
    w = torch.as_tensor(np.random.default_rng(11000 + rank).standard_normal((T, 1, H)), dtype=torch.float32)
    placements = [np.stack([rng.permutation(E)]) for _ in range(steps)]

    def train(relibra: bool):
        layer = harness.build_moe_layer(E, K, hidden=H, ffn=FFN, dtype=dtype, seed=seed, experts=experts)
        rt = None
        if relibra:
            rt = RelibraRuntime(topo)
            rt.patch_layer(layer, 0)
        model, opt = _megatron_distopt(layer, overlap=True, bucket_size=64)
        if rt is not None:
            rt.attach_ddp(model)
        losses = []
        for s in range(steps):
            loss = _train_step_forward_backward(model, layer, rt, opt, topo, placements[s], ids[s], xs[s], w, rank, s)
            model.finish_grad_sync()
            ok, _, _ = opt.step()
            assert ok
            dist.all_reduce(loss)
            losses.append(loss.item())
        return layer, model, opt, rt, losses

    ref_layer, _, ref_opt, _, ref_losses = train(False)
    layer, _, opt, rt, losses = train(True)
    tmp = tempfile.mkdtemp()
    path = lambda name: os.path.join(tmp, f"{name}{rank}.pt")  # noqa: E731

    def save(lay, o, tag):
        # Megatron's legacy checkpoint: model + optimizer state_dict, and the dp-zero parameter state
        torch.save({"model": lay.state_dict(), "optimizer": o.state_dict()}, path(tag + "_model"))
        o.save_parameter_state(path(tag + "_distopt"))

    ref_sd = {k: v.clone() for k, v in ref_layer.state_dict().items() if torch.is_tensor(v)}
    ref_state = _expert_opt_state(ref_layer, ref_opt)
    save(ref_layer, ref_opt, "ref")
    placed = _expert_opt_state(layer, opt)
    with canonical_order(rt, opt):
        sd = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
        state = _expert_opt_state(layer, opt)
        save(layer, opt, "relibra")
    # a plain Megatron layer + optimizer (other initial weights) loads the relibra checkpoint
    plain = harness.build_moe_layer(E, K, hidden=H, ffn=FFN, dtype=dtype, seed=seed + 1, experts=experts)
    _, plain_opt = _megatron_distopt(plain, overlap=True, bucket_size=64)
    ckpt = torch.load(path("relibra_model"), weights_only=False)
    plain.load_state_dict(ckpt["model"])
    plain_opt.load_state_dict(ckpt["optimizer"])
    for o in plain_opt.chained_optimizers:
        # Megatron 0.19.2 with torch's AdamW (no Apex/TE, as on CPU) fails to load its own dp-zero file: torch
        # keeps a per-parameter `step` tensor that the file lacks (KeyError 'step' at distrib_optimizer.py
        # :1223): keep the tensors the file does not hold
        o._set_main_param_and_optimizer_states = (
            lambda p, t, o=o, f=o._set_main_param_and_optimizer_states:
            f(p, {**o._get_main_param_and_optimizer_states(p), **t}))
    with torch.no_grad():  # fp32 params: main params are views of the (leaf) model params
        plain_opt.load_parameter_state(path("relibra_distopt"))
    loaded = {k: v for k, v in plain.state_dict().items() if torch.is_tensor(v)}
    loaded_state = _expert_opt_state(plain, plain_opt)

    def flat(obj):  # tensors of a nested checkpoint, in a fixed order
        if torch.is_tensor(obj):
            return [obj.float()]
        if isinstance(obj, dict):
            return [t for k in sorted(obj, key=str) for t in flat(obj[k])]
        if isinstance(obj, (list, tuple)):
            return [t for x in obj for t in flat(x)]
        return []

    ref_files = flat([torch.load(path("ref_distopt"), weights_only=False)])
    got_files = flat([torch.load(path("relibra_distopt"), weights_only=False)])
    rel = lambda a, b: harness.diff(a, b)[1]  # noqa: E731 (inf on NaN/Inf)
    return {
        "ref_losses": ref_losses, "losses": losses, "n_state": len(ref_state),
        "optimizer": [type(o).__name__ for o in opt.chained_optimizers],
        "weights_rel": max(rel(ref_sd[k], sd[k]) for k in ref_sd),
        "state_rel": max(rel(a, b) for a, b in zip(ref_state, state)),
        "placed_differs": any(not torch.equal(a, b) for a, b in zip(state, placed)),
        "ckpt_weights_rel": max(rel(ref_sd[k], loaded[k]) for k in ref_sd),
        "ckpt_state_rel": max(rel(a, b) for a, b in zip(ref_state, loaded_state)),
        "ckpt_file_tensors": len(ref_files),
        "same_file_layout": [t.shape for t in ref_files] == [t.shape for t in got_files],
        "ckpt_file_rel": max([rel(a, b) for a, b in zip(ref_files, got_files)], default=0.0),
        "bitwise": (ref_losses == losses and all(torch.equal(ref_sd[k], sd[k]) for k in ref_sd)
                    and all(torch.equal(a, b) for a, b in zip(ref_state, state))
                    and all(torch.equal(a, b) for a, b in zip(ref_files, got_files))),
        "migration_bytes": rt.metrics.migration_bytes, "sync_bytes": rt.metrics.replica_sync_bytes,
        "by_kind": dict(rt.metrics.migration_bytes_by_kind),
    }


CASES["distopt_bf16_reorder"] = lambda r, w: _distopt_steps(r, w, R=0, dtype=torch.bfloat16)
CASES["distopt_fp32_replicas"] = lambda r, w: _distopt_steps(r, w, R=2, dtype=torch.float32)
CASES["grouped_distopt_fp32_replicas"] = lambda r, w: _distopt_steps(r, w, R=2, dtype=torch.float32,
                                                                     experts="grouped")


def _train_step_forward_backward(model, layer, rt, opt, topo, placement, ids_step, xs_step, w, rank, step):
    """Forward + backward of one training step over its 2 micro-batches; with relibra (rt) the step's
    placement is applied and a random plan installed first. Returns this rank's summed loss (float64)."""
    from relibra_verl.runtime import harness
    from relibra_verl.runtime.reorder import apply_placement

    if rt is not None:
        apply_placement(rt, placement, opt)
        c = np.zeros((2, 1, topo.G, topo.E), dtype=np.int64)
        for m in range(2):
            c[m, 0] = _counts(ids_step[m])[0, 0]
        rt.set_plan(harness.random_plan(topo, c, np.random.default_rng(step), expert_at_home=placement))
    model.zero_grad_buffer()
    opt.zero_grad()
    loss = torch.zeros((), dtype=torch.float64)
    for m in range(2):
        if rt is not None:
            rt.set_micro_batch(m)
        harness.replay(layer, ids_step[m][rank])
        out, _ = model(xs_step[m].clone().requires_grad_())
        lm = (out.float() * w).sum()   # .float(): bf16 layers accumulate the loss in fp32
        lm.backward()
        loss += lm.detach().double()
    return loss
