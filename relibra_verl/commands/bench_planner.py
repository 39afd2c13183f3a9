"""`relibra-verl bench-planner`: time relibra's planner on synthetic loads of a real model's shape.

The loads are skewed like real routing (a per-layer Zipf popularity, hottest expert several times the
mean, per-rank noise) so the replication loop does the work it does in training; the figures are the
planner's wall time on one CPU core (set OMP_NUM_THREADS=1 to pin it), on the loads in the layout the verl
trainer plans (planning_layout): the whole batch as simulate plans it (placement and replicas), and the
first micro-batch's replicas, which the verl trainer plans on the critical path. `--scale deepseek-v3`
times DeepSeek-V3's shape on 32 nodes (EP 256, 64 micro-batches) and reports the process's peak memory.
`--contention` times a launch-bound torch loop (what a GPU training thread does between kernel launches)
alone and while the verl trainer's background planning runs beside it, in one run, and reports their
ratio, training_thread_slowdown; beside it the control busy_process_slowdown, the same loop beside a process
that computes as long and plans nothing (what a busy core costs this one on the machine at hand).
"""
from __future__ import annotations

import json
import os
import resource
import time

import numpy as np

from relibra_verl.config import RelibraConfig
from relibra_verl.errors import UsageError
from relibra_verl.planner import Topology, load_profile, plan_relibra, planner_configs
from relibra_verl.planner.types import PlanError, planning_layout
from relibra_verl.sim.presets import get_preset

# (MoE layers, routed experts, top-k), from ../shared/reference/facts.md "Model shapes"
PLANNER_SHAPES = {
    "qwen3-30b-a3b": (48, 128, 8),
    "qwen3-235b-a22b": (94, 128, 8),
    "deepseek-v3": (58, 256, 8),
    "deepseek-v2-lite": (26, 64, 6),
}

# --scale: (preset, EP, GPUs per node, micro-batches, replica slots)
SCALES = {"deepseek-v3": ("deepseek-v3", 256, 8, 64, 2)}


def synthetic_counts(layers: int, experts: int, topk: int, ep: int, micro_batches: int, tokens_per_rank: int,
                     seed: int = 0) -> np.ndarray:
    """Skewed loads [M, L, G, E]: per layer a shuffled Zipf(0.9) popularity, per (micro-batch, rank) a
    Dirichlet draw around it (over-dispersion of long sequences), pairs = tokens_per_rank * topk."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, experts + 1) ** 0.9
    counts = np.empty((micro_batches, layers, ep, experts), dtype=np.int64)
    for l in range(layers):
        pop = rng.permutation(base / base.sum())
        p = rng.dirichlet(pop * 200.0, size=(micro_batches, ep))
        counts[:, l] = rng.multinomial(tokens_per_rank * topk, p / p.sum(-1, keepdims=True))
    return counts


def synthetic_counts_large(layers: int, experts: int, topk: int, ep: int, micro_batches: int, tokens_per_rank: int,
                           seed: int = 0) -> np.ndarray:
    """The same skew at scale, int32 and ~50x faster to draw: the per-(micro-batch, rank) noise is lognormal
    (sigma 0.5) around the layer's popularity and the pairs are rounded, not sampled."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, experts + 1) ** 0.9
    counts = np.empty((micro_batches, layers, ep, experts), dtype=np.int32)
    for l in range(layers):
        pop = rng.permutation(base / base.sum()).astype(np.float32)
        p = pop * np.exp(np.float32(0.5) * rng.standard_normal((micro_batches, ep, experts), dtype=np.float32))
        counts[:, l] = np.rint(p * (tokens_per_rank * topk / p.sum(-1, keepdims=True)))
    return counts


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-planner", help="time the planner on synthetic loads of a model's shape",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PLANNER_SHAPES))
    p.add_argument("--ep", type=int, default=32)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--replica-slots", type=int, default=2)
    p.add_argument("--tokens-per-rank", type=int, default=4096)
    p.add_argument("--scale", default=None, choices=sorted(SCALES),
                   help="a large configuration instead of the flags above: deepseek-v3 = 58 layers x 256 experts, "
                        "EP 256 on 32 nodes, 64 micro-batches, R=2 (reports peak memory too)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    p.add_argument("--mode", default="both", choices=("both", "reorder", "replicate"))
    p.add_argument("--inter-node-share", type=float, default=RelibraConfig().inter_node_share,
                   help="the reorder's weight of the busiest NIC (default: the verl config's default; 0: nodes by pairs)")
    p.add_argument("--profile", default=RelibraConfig().profile, metavar="NAME|PATH|none",
                   help="hardware profile for the time-aware planner configuration, as the verl trainer derives it "
                        "(default: the verl config's default; none: pair counts)")
    p.add_argument("--contention", action="store_true",
                   help="also time a launch-bound torch loop alone and beside the trainer's background planning")
    p.add_argument("--json", default=None, metavar="PATH")
    p.set_defaults(func=run)


def _median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (compiled kernels loaded from the disk cache, allocator)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), times


def run(args) -> int:
    if args.scale:
        args.preset, args.ep, args.gpus_per_node, args.micro_batches, args.replica_slots = SCALES[args.scale]
    L, E, K = PLANNER_SHAPES[args.preset]
    try:
        topo = Topology(E, args.ep, args.gpus_per_node, args.replica_slots)
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    if not 0.0 <= args.inter_node_share < 1.0:
        raise UsageError(f"--inter-node-share must be in [0, 1), got {args.inter_node_share}")
    draw = synthetic_counts_large if args.scale else synthetic_counts
    # in the layout the verl trainer plans them in (int32, read-only): what its planning process runs
    counts = planning_layout(draw(L, E, K, args.ep, args.micro_batches, args.tokens_per_rank))
    # what the verl trainer plans with: planner_configs for the preset's expert shape
    profile = None if args.profile == "none" else load_profile(args.profile)
    replication, reorder = planner_configs(get_preset(args.preset), profile, topo.num_nodes, topo.ranks_per_node,
                                           reorder_inter_node_share=args.inter_node_share)
    whole = lambda: plan_relibra(counts, topo, mode=args.mode, replication=replication, reorder=reorder)
    first = lambda: plan_relibra(counts[:1], topo, mode="replicate", replication=replication)
    whole_ms, runs = _median_ms(whole, args.repeats)
    first_ms, first_runs = _median_ms(first, args.repeats)
    plan = whole()
    pairs = args.micro_batches * L
    report = {
        "preset": args.preset, "layers": L, "experts": E, "topk": K, "ep": args.ep,
        "gpus_per_node": args.gpus_per_node, "micro_batches": args.micro_batches,
        "replica_slots": args.replica_slots, "tokens_per_rank": args.tokens_per_rank, "mode": args.mode,
        "inter_node_share": args.inter_node_share, "profile": args.profile, "scale": args.scale,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "whole_batch_ms": whole_ms, "per_layer_microbatch_us": whole_ms * 1e3 / pairs, "runs_ms": runs,
        "first_micro_batch_ms": first_ms, "first_micro_batch_runs_ms": first_runs,
        "replicas_planned": int((plan.replica_expert >= 0).sum()),
        "moved_experts": int(plan.moved_experts.sum()),
        "counts_gb": counts.nbytes / 1e9,
        # Linux reports ru_maxrss in KiB: the process's peak, loads and the plan included
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    print(f"bench-planner {args.preset}: L={L} E={E} top-{K}, EP {args.ep} ({topo.num_nodes} nodes x {args.gpus_per_node}),"
          f" {args.micro_batches} micro-batches, R={args.replica_slots}, mode={args.mode}, profile={args.profile},"
          f" inter_node_share={args.inter_node_share}")
    print(f"  whole_batch_ms          {whole_ms:9.2f}   (median of {len(runs)})")
    print(f"  per_layer_microbatch_us {report['per_layer_microbatch_us']:9.2f}   ({pairs} (micro-batch, layer) pairs)")
    print(f"  first_micro_batch_ms    {first_ms:9.2f}   (its replicas, on the trainer's critical path)")
    print(f"  peak_rss_gb             {report['peak_rss_gb']:9.2f}   (the process's peak; the loads take {report['counts_gb']:.2f})")
    print(f"  replicas planned {report['replicas_planned']}, experts moved {report['moved_experts']}")
    if args.contention:
        from relibra_verl.integration.trainer import background_planning_contention

        report.update(background_planning_contention(counts, topo, replication, reorder))
        print(f"  training_loop_alone_us  {report['training_loop_alone_us']:9.2f}   (per iteration of small torch ops)")
        print(f"  training_loop_beside_us {report['training_loop_beside_us']:9.2f}   (while the trainer's background "
              f"planning runs: {report['planner']})")
        q1, q3 = report["slowdown_quartiles"]
        print(f"  training_thread_slowdown {report['training_thread_slowdown']:8.3f}   (median of "
              f"{len(report['slowdown_rounds'])} paired rounds; quartiles {q1:.3f}-{q3:.3f})")
        q1, q3 = report["busy_process_slowdown_quartiles"]
        print(f"  busy_process_slowdown   {report['busy_process_slowdown']:9.3f}   (control: a process computing as long, "
              f"planning nothing; quartiles {q1:.3f}-{q3:.3f})")
        q1, q3 = report["thread_slowdown_quartiles"]
        print(f"  the same planning in a thread of this process: {report['training_loop_beside_thread_us']:.2f} us, "
              f"slowdown {report['thread_slowdown']:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
