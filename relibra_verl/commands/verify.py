"""`relibra-verl verify`: check that relibra's runtime reproduces stock Megatron on this installation.

Spawns `--ep` gloo ranks on this machine (nodes simulated by grouping `--gpus-per-node` ranks), builds
small real Megatron-Core MoE layers (SequentialMLP or TEGroupedMLP experts, all-to-all dispatcher) with the trace's expert
count and top-k, forces the trace's routing with Megatron's router replay (trace tokens are dealt to ranks
in order, `--tokens-per-rank` each, a few MoE layers evenly spread over the trace's), runs forward+backward
with and without relibra on identical inputs, and reports balance, differences and overheads (replica
weight sync and gradient reduction bytes, send-ahead hits, peak extra memory per rank, and the bytes one
reorder migrates with Megatron's DistributedOptimizer state: bf16 weights, fp32 main params, Adam m and v).
Balance is measured: the tokens each expert (stock) and each physical slot (relibra) computed, counted by the
runtime; a run whose slots did not compute what the plan assigned them is reported as not as planned.
A NaN or Inf in any compared tensor is not exact. Exit 0 when exact (max relative difference <= --tolerance,
all values finite) and balanced as planned, 1 when not, 2 for bad input.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from relibra_verl.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check relibra's Megatron runtime against stock Megatron on gloo ranks",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, required=True, help="EP ranks to spawn (gloo processes)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks per simulated node")
    p.add_argument("--trace", required=True, help="routing trace: PATH or bundled:NAME")
    p.add_argument("--replica-slots", type=int, default=2, help="replica slots R per rank (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout only)")
    p.add_argument("--layers", type=int, default=4, help="MoE layers of the trace to use (default 4)")
    p.add_argument("--tokens-per-rank", type=int, default=256, help="trace tokens per rank (default 256)")
    p.add_argument("--hidden", type=int, default=32, help="hidden size of the test layer (default 32)")
    p.add_argument("--ffn", type=int, default=16, help="expert FFN size (default 16)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative difference counted as exact (default 1e-5 fp32, 2e-2 bf16)")
    p.add_argument("--mode", choices=("both", "replicate", "reorder"), default="both",
                   help="planner mode: reorder experts across ranks and/or replicate inside nodes (default both)")
    p.add_argument("--experts", choices=("sequential", "grouped"), default="sequential",
                   help="experts module: Megatron's SequentialMLP, or its TEGroupedMLP over relibra's torch grouped "
                        "linear with Transformer Engine's interface (replicas as extra groups of one GEMM call)")
    p.add_argument("--permute", choices=("torch", "triton"), default="torch",
                   help="permutation over physical slots: Megatron's unfused torch permute, or relibra's Triton "
                        "kernels (Triton's interpreter on CPU; slot assignment by Triton too)")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="slot assignment: relibra_verl.kernels (auto: Triton on CUDA, torch reference on CPU) or torch")
    p.add_argument("--inject-nonfinite", choices=("nan", "inf"), default=None,
                   help="self-check of the comparison: one NaN/Inf in rank 0's input to both runs; verify must then "
                        "report NOT EXACT")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="fetch replica weights when needed (one pool of R slots) instead of sending them ahead")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are killed")
    p.set_defaults(func=run)


def _select(trace, G: int, T: int, L: int):
    """[G, T, L, K] routes: tokens with every selected layer known, dealt to ranks in trace order."""
    layers = np.unique(np.linspace(0, trace.num_layers - 1, num=min(L, trace.num_layers)).round().astype(int))
    ids = trace.expert_ids[:, layers]
    ids = ids[(ids >= 0).all(axis=(1, 2))]
    if ids.shape[0] < G:
        raise UsageError(f"{trace.name}: only {ids.shape[0]} fully routed tokens, need at least one per rank")
    T = min(T, ids.shape[0] // G)
    return ids[: G * T].reshape(G, T, len(layers), -1).astype(np.int64), layers


def run(args) -> int:
    from relibra_verl.planner.relibra import plan_relibra
    from relibra_verl.planner.types import PlanError, Topology
    from relibra_verl.routing.trace import load_trace

    if args.ep < 2:
        raise UsageError("--ep must be at least 2")
    if args.gpus_per_node < 1 or args.ep % args.gpus_per_node:
        raise UsageError(f"--ep {args.ep} must be a multiple of --gpus-per-node {args.gpus_per_node}")
    if args.replica_slots < 0 or args.layers < 1 or args.tokens_per_rank < 1:
        raise UsageError("--replica-slots must be >= 0, --layers and --tokens-per-rank >= 1")
    trace = load_trace(args.trace)
    E = int(trace.num_experts)
    try:
        topo = Topology(num_experts=E, ep_size=args.ep, gpus_per_node=args.gpus_per_node,
                        replica_slots=args.replica_slots)
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    if trace.topk > E:
        raise UsageError(f"{trace.name}: top-k {trace.topk} > {E} experts")
    ids, layers = _select(trace, topo.G, args.tokens_per_rank, args.layers)
    G, T, L, K = ids.shape
    counts = np.zeros((1, L, G, E), dtype=np.int64)
    for r in range(G):
        for l in range(L):
            np.add.at(counts[0, l, r], ids[r, :, l].reshape(-1), 1)
    plan = plan_relibra(counts, topo, mode=args.mode)
    before, after = _balance(topo, plan, ids)
    tol = args.tolerance if args.tolerance is not None else (1e-5 if args.dtype == "float32" else 2e-2)
    kernels = "triton" if args.permute == "triton" else args.kernels
    job = {"topo": topo, "plan": plan, "ids": ids, "hidden": args.hidden, "ffn": args.ffn,
           "dtype": args.dtype, "kernels": kernels, "prefetch": args.prefetch, "experts": args.experts,
           "inject": args.inject_nonfinite}

    from relibra_verl.runtime.executed import planned_tokens
    from relibra_verl.runtime.launch import RankError, spawn_ranks
    from relibra_verl.runtime.verify_run import run_rank

    t0 = time.perf_counter()
    # the ranks import Megatron and torch.distributed, whose deprecation and "TE not installed" warnings
    # would bury the report; a user's own PYTHONWARNINGS setting wins
    env = {}
    if "PYTHONWARNINGS" not in os.environ:
        env["PYTHONWARNINGS"] = "ignore"
    if kernels == "triton" and not _cuda():  # CPU ranks run the Triton kernels in Triton's interpreter
        env["TRITON_INTERPRET"] = "1"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        res = spawn_ranks(run_rank, G, job, timeout=args.timeout)
    except (RankError, TimeoutError) as exc:
        print(f"relibra-verl verify: ranks failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    wall = time.perf_counter() - t0
    worst: dict = {}
    for r in res:
        for name, (ad, rel) in r["diffs"].items():
            key = name.split(".", 1)[1].split(".")[0] if ".expert_grad." not in name else "expert_weight_grad"
            key = {"output": "output", "input_grad": "input_grad", "router_grad": "router_grad"}.get(key, key)
            a, b = worst.get(key, (0.0, 0.0))
            worst[key] = (max(a, ad), max(b, rel))
    max_rel = max(v[1] for v in worst.values())  # diffs are inf, never NaN, where a value is not finite
    nonfinite = sorted({n for r in res for n in r["nonfinite"]})
    # measured: tokens each slot computed (stock run: Megatron's experts; relibra run: physical slots)
    S = topo.S
    executed = res[0]["executed"]                       # [L, G, S+R]
    measured_before = res[0]["stock_executed"].sum(2)    # [L, G]
    measured_after = executed.sum(2)
    planned = planned_tokens(topo, plan, list(ids))     # [L, G, S+R] the plan replayed on the routes
    as_planned = bool(np.array_equal(executed, planned))
    imb = lambda load: float(np.mean(load.max(axis=1) / load.mean(axis=1)))  # noqa: E731
    exact = bool(max_rel <= tol) and not nonfinite
    report = {
        "ok": exact and as_planned,
        "exact": exact, "max_rel_diff": max_rel, "tolerance": tol, "nonfinite": nonfinite,
        "balance_as_planned": as_planned,
        "imbalance_before": imb(measured_before), "imbalance_after": imb(measured_after),
        "imbalance_after_planned": imb(after),
        "imbalance_before_per_layer": [float(x) for x in measured_before.max(1) / measured_before.mean(1)],
        "imbalance_after_per_layer": [float(x) for x in measured_after.max(1) / measured_after.mean(1)],
        "tokens_per_rank_before": measured_before.sum(0).tolist(), "tokens_per_rank_after": measured_after.sum(0).tolist(),
        "tokens_per_rank_after_planned": after.sum(0).tolist(),
        "replica_tokens": int(executed[:, :, S:].sum()), "replica_tokens_planned": int(planned[:, :, S:].sum()),
        "replica_tokens_per_rank": executed[:, :, S:].sum(axis=(0, 2)).tolist(),
        "permute_calls": {k: int(sum(r["permute_calls"].get(k, 0) for r in res))
                          for k in sorted({k for r in res for k in r["permute_calls"]})},
        "grad_returns_async": int(sum(r["grad_returns_async"] for r in res)),
        "diffs": {k: {"max_abs": v[0], "max_rel": v[1]} for k, v in worst.items()},
        "replica_sync_bytes": int(sum(r["replica_sync_bytes"] for r in res)),
        "grad_reduce_bytes": int(sum(r["grad_reduce_bytes"] for r in res)),
        "prefetch": bool(args.prefetch),
        "replica_fetches": {k: int(sum(r[f"fetches_{k}"] for r in res)) for k in ("ahead", "blocking", "reused")},
        # one reorder (this plan's placement) with Megatron DistributedOptimizer state, summed over ranks
        "migration_bytes": int(sum(r["migration"]["bytes"] for r in res)),
        "migration_bytes_by_kind": {k: int(sum(r["migration"]["by_kind"].get(k, 0) for r in res))
                                    for k in ("weights", "main_params", "optimizer_state")},
        "migration_seconds_max": max(r["migration"]["seconds"] for r in res),
        "migration_weight_bytes_test_dtype": int(sum(r["migration_weight_bytes"] for r in res)),
        "experts_moved": int(plan.moved_experts.sum()),
        "peak_extra_memory_bytes": int(max(r["pool_bytes"] + r["peak_send_bytes"] for r in res)),
        "replica_pool_bytes_per_rank": int(max(r["pool_bytes"] for r in res)),
        "peak_transient_bytes_per_rank": int(max(r["peak_send_bytes"] for r in res)),
        "config": {"ep": G, "gpus_per_node": args.gpus_per_node, "replica_slots": topo.R, "experts": E,
                   "topk": K, "trace": args.trace, "trace_layers": layers.tolist(), "tokens_per_rank": T,
                   "hidden": args.hidden, "ffn": args.ffn, "dtype": args.dtype, "mode": args.mode,
                   "experts_impl": {"sequential": "SequentialMLP", "grouped": "TEGroupedMLP"}[args.experts],
                   "permute": args.permute, "kernels": kernels, "dispatcher": "alltoall",
                   "inject_nonfinite": args.inject_nonfinite,
                   "migration_optimizer": res[0]["migration"]["optimizer"]},
        "seconds": {"wall": wall, "stock_step_max": max(r["seconds_stock"] for r in res),
                    "relibra_step_max": max(r["seconds_relibra"] for r in res)},
    }
    _print(report)
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump(_finite(report), f, indent=2)
    elif args.json == "-":
        print(json.dumps(_finite(report)))
    return 0 if report["ok"] else 1


def _finite(obj):
    """The report for strict JSON: a non-finite float (a NaN or Inf was compared) becomes null."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _balance(topo, plan, ids):
    """Pairs computed per rank [L, G] with Megatron's placement and under the plan."""
    import torch

    from relibra_verl.runtime import harness

    G, T, L, K = ids.shape
    before = np.zeros((L, G), dtype=np.int64)
    after = np.zeros((L, G), dtype=np.int64)
    for l in range(L):
        per_rank = [torch.as_tensor(ids[r, :, l]) for r in range(G)]
        before[l] = harness.tokens_per_rank(topo, None, per_rank)
        after[l] = harness.tokens_per_rank(topo, plan, per_rank, layer=l)
    return before, after


def _print(rep: dict) -> None:
    c = rep["config"]
    print(f"relibra-verl verify: EP {c['ep']} ({c['ep'] // c['gpus_per_node']} nodes x {c['gpus_per_node']}), "
          f"R={c['replica_slots']}, {c['experts']} experts top-{c['topk']}, trace {c['trace']} layers "
          f"{c['trace_layers']}, {c['tokens_per_rank']} tokens/rank, {c['dtype']}, {c['experts_impl']}")
    print(f"  experts {c['experts_impl']}, permute {c['permute']} (dispatches by path: {rep['permute_calls']})")
    print(f"  tokens per rank before (measured): {rep['tokens_per_rank_before']}")
    print(f"  tokens per rank after (measured):  {rep['tokens_per_rank_after']}"
          f"{'' if rep['balance_as_planned'] else '  planned: ' + str(rep['tokens_per_rank_after_planned'])}")
    print(f"  replica tokens (measured): {rep['replica_tokens']} (per rank {rep['replica_tokens_per_rank']}), "
          f"planned {rep['replica_tokens_planned']}: {'as planned' if rep['balance_as_planned'] else 'NOT AS PLANNED'}")
    print(f"  imbalance (max/mean, mean over layers, measured): {rep['imbalance_before']:.3f} -> "
          f"{rep['imbalance_after']:.3f}")
    for k, v in rep["diffs"].items():
        print(f"  {k:<18} max abs {v['max_abs']:.3e}  max rel {v['max_rel']:.3e}")
    f = rep["replica_fetches"]
    print(f"  replica weight sync {rep['replica_sync_bytes']} B (fetches: {f['ahead']} sent ahead, {f['blocking']} "
          f"on demand, {f['reused']} reused in backward), replica grad reduction {rep['grad_reduce_bytes']} B")
    slots = "2 x R" if rep["prefetch"] else "R"
    print(f"  peak extra memory {rep['peak_extra_memory_bytes']} B/rank: replica pool "
          f"{rep['replica_pool_bytes_per_rank']} B "
          f"({slots} expert slots, send-ahead {'on' if rep['prefetch'] else 'off'}) + transient "
          f"{rep['peak_transient_bytes_per_rank']} B")
    k = rep["migration_bytes_by_kind"]
    print(f"  reordering: {rep['experts_moved']} experts moved; one reorder migrates {rep['migration_bytes']} B with "
          f"Megatron DistributedOptimizer state (bf16 weights {k['weights']} B, fp32 main params {k['main_params']} B, "
          f"Adam m+v {k['optimizer_state']} B), {rep['migration_seconds_max'] * 1e3:.1f} ms")
    if rep["nonfinite"]:
        more = len(rep["nonfinite"]) - 4
        print(f"  non-finite values (NaN/Inf) in: {', '.join(rep['nonfinite'][:4])}"
              f"{f' and {more} more (all in the JSON report)' if more > 0 else ''}")
    print(f"  {'EXACT' if rep['exact'] else 'NOT EXACT'} (max rel diff {rep['max_rel_diff']:.3e}, "
          f"tolerance {rep['tolerance']:.0e})")
