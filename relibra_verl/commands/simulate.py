# handoff: sim may edit
"""`relibra-verl simulate`: replay recorded routing through every strategy and report the balance.

Batches: with `--trace` alone, all sequences of the traces form the data, shuffled with `--seed`, and
`--steps N` cuts it into N consecutive batches. With `--resample N`, every step draws N sequences with
replacement, plus one warm-up draw before the first step. Each batch is split over EP ranks and
micro-batches as verl's dynamic batching does (relibra_verl.routing.loads).

History: `eplb-history` plans a batch on the previous batch's loads: the warm-up draw for the first
resampled step, the last batch (cyclically) for the first of several shuffled steps. With one shuffled
batch there is no previous batch, and eplb-history is left out with a note rather than faked.
"""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np

from relibra_verl.errors import UsageError
from relibra_verl.planner.relibra import ReplicationConfig
from relibra_verl.planner.strategies import STRATEGIES, StrategyResult, run_strategy
from relibra_verl.planner.types import PlanError, Topology
from relibra_verl.routing.loads import count_loads, form_batch, select_sequences, split_micro_batches
from relibra_verl.routing.trace import Trace, load_trace


@dataclasses.dataclass
class ReplayRun:
    """Per strategy, one StrategyResult per measured step; counts [M, L, G, E] per step."""

    topo: Topology
    counts: list[np.ndarray]
    results: dict[str, list[StrategyResult]]
    notes: list[str]


def add_replay_arguments(p) -> None:
    """Flags shared by every command that replays traces through the planners."""
    p.add_argument("--trace", action="append", required=True, metavar="PATH|bundled:NAME",
                   help="routing trace (npz); repeat to mix traces into one batch")
    p.add_argument("--ep", type=int, required=True, metavar="G", help="expert-parallel ranks")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="g", help="EP ranks per node")
    p.add_argument("--replica-slots", type=int, default=2, metavar="R", help="replica slots per rank (default 2)")
    p.add_argument("--tokens-per-rank", type=int, required=True, metavar="T",
                   help="token budget per rank per micro-batch (verl's max_token_len_per_gpu)")
    p.add_argument("--resample", type=int, default=None, metavar="N",
                   help="draw N sequences with replacement per step instead of using each sequence once")
    p.add_argument("--steps", type=int, default=1, metavar="S", help="batches (RL steps) to simulate (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of: " + ", ".join(STRATEGIES))
    p.add_argument("--min-replica-tokens", type=int, default=1, metavar="N",
                   help="relibra: a replica must carry at least N routed pairs (default 1)")
    p.add_argument("--max-copies-per-owner", type=int, default=None, metavar="N",
                   help="relibra: replicas one rank may send per micro-batch and layer (default unlimited)")
    p.add_argument("--num-groups", type=int, default=1, metavar="N",
                   help="expert groups of the model, for EPLB's hierarchical mode (default 1: global EPLB)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="replay routing traces through the balancing strategies",
                              description=__doc__.split("\n\n")[0])
    add_replay_arguments(p)
    p.set_defaults(func=run)


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise UsageError(f"unknown strategy {unknown[0] if unknown else '(none)'}; choose from {', '.join(STRATEGIES)}")
    return names


def build_batches(traces: list[Trace], args) -> tuple[list[Trace], Trace | None]:
    """The measured batches and the warm-up batch (resample mode only)."""
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.resample is not None:
        draws = [form_batch(traces, seed=args.seed + i, resample=args.resample, max_seq_len=args.tokens_per_rank)
                 for i in range(args.steps + 1)]
        return draws[1:], draws[0]
    batch = form_batch(traces, seed=args.seed)
    if args.steps > batch.num_seqs:
        raise UsageError(f"--steps {args.steps} is more than the {batch.num_seqs} sequences of the traces")
    parts = np.array_split(np.arange(batch.num_seqs), args.steps)
    return [select_sequences(batch, p) for p in parts], None


def replay(args) -> ReplayRun:
    """Load traces, form batches, count loads and run every requested strategy on every step."""
    strategies = parse_strategies(args.strategies)
    traces = [load_trace(spec) for spec in args.trace]
    E = traces[0].num_experts
    try:
        topo = Topology(E, args.ep, args.gpus_per_node, args.replica_slots)
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    notes = []
    long_seqs = sum(int((t.seq_lens() > args.tokens_per_rank).sum()) for t in traces)
    if args.resample is not None and long_seqs:
        notes.append(f"{long_seqs} recorded sequence(s) longer than --tokens-per-rank {args.tokens_per_rank} are not drawn")
    batches, warmup = build_batches(traces, args)
    counts = [count_loads(b, split_micro_batches(b.seq_lens(), args.ep, args.tokens_per_rank)) for b in batches]
    history = [count_loads(warmup, split_micro_batches(warmup.seq_lens(), args.ep, args.tokens_per_rank))] if warmup else []
    if "eplb-history" in strategies and warmup is None and len(counts) == 1:
        strategies.remove("eplb-history")
        notes.append("eplb-history left out: one shuffled batch has no previous batch (use --steps >= 2 or --resample)")
    replication = ReplicationConfig(min_replica_tokens=args.min_replica_tokens,
                                    max_copies_per_owner=args.max_copies_per_owner)
    results: dict[str, list[StrategyResult]] = {}
    for name in strategies:
        prev = None
        per_step = []
        for i, c in enumerate(counts):
            hist = counts[i - 1] if i > 0 else (history[0] if history else counts[-1])
            res = run_strategy(name, c, topo, history_counts=hist, prev_placement=prev,
                               num_groups=args.num_groups, replication=replication)
            prev = res.placement
            per_step.append(res)
        results[name] = per_step
    return ReplayRun(topo, counts, results, notes)


def summarize(run: ReplayRun) -> dict[str, dict]:
    """Per strategy: imbalance p50/p95/max over all (step, micro-batch, layer), replicas, moves, plan time."""
    out = {}
    for name, steps in run.results.items():
        imb = np.concatenate([r.imbalance().reshape(-1) for r in steps])
        out[name] = {
            "imbalance": {"p50": float(np.percentile(imb, 50)), "p95": float(np.percentile(imb, 95)), "max": float(imb.max())},
            "replicas_per_microbatch_layer": float(np.mean([r.replicas.sum((0, 2)).mean() / r.replicas.shape[0] for r in steps])),
            "moved_experts_per_step": float(np.mean([r.moved_experts.sum() for r in steps])),
            "plan_ms": float(np.mean([r.plan_ms for r in steps])),
        }
    return out


def print_table(summary: dict[str, dict], header: str, file=sys.stdout) -> None:
    print(header, file=file)
    print(f"{'strategy':<19}{'p50':>8}{'p95':>8}{'max':>8}  {'replicas/mb/layer':>17}  {'moved/step':>10}  {'plan ms':>8}", file=file)
    for name, s in summary.items():
        i = s["imbalance"]
        print(f"{name:<19}{i['p50']:>8.3f}{i['p95']:>8.3f}{i['max']:>8.3f}  {s['replicas_per_microbatch_layer']:>17.1f}"
              f"  {s['moved_experts_per_step']:>10.0f}  {s['plan_ms']:>8.1f}", file=file)


def config_dict(args, run: ReplayRun) -> dict:
    c = run.counts[0]
    return {
        "traces": args.trace, "ep": args.ep, "gpus_per_node": args.gpus_per_node, "nodes": run.topo.num_nodes,
        "replica_slots": args.replica_slots, "tokens_per_rank": args.tokens_per_rank, "resample": args.resample,
        "steps": args.steps, "seed": args.seed, "num_experts": run.topo.E, "moe_layers": int(c.shape[1]),
        "micro_batches_per_step": [int(x.shape[0]) for x in run.counts],
        "routed_pairs_per_step": [int(x.sum()) for x in run.counts],
        "min_replica_tokens": args.min_replica_tokens, "max_copies_per_owner": args.max_copies_per_owner,
        "notes": run.notes,
    }


def run(args) -> int:
    result = replay(args)
    summary = summarize(result)
    cfg = config_dict(args, result)
    header = (f"relibra-verl simulate: {' + '.join(args.trace)} | EP {args.ep} on {result.topo.num_nodes} node(s) x "
              f"{args.gpus_per_node} | R={args.replica_slots} | {args.tokens_per_rank} tokens/rank/micro-batch | "
              f"{args.steps} step(s), micro-batches {cfg['micro_batches_per_step']}, layers {cfg['moe_layers']}\n"
              "imbalance = max / mean routed pairs per rank, over every (step, micro-batch, MoE layer)")
    print_table(summary, header)
    for note in result.notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "strategies": summary}, f, indent=2)
    return 0
