# handoff: sim may edit
"""`relibra-verl simulate`: replay recorded routing through every strategy and report the balance.

Batches: with `--trace` alone, all sequences of the traces form the data, shuffled with `--seed`, and
`--steps N` cuts it into N consecutive batches. With `--resample N`, every step draws N sequences with
replacement, plus one warm-up draw before the first step. Each batch is split over EP ranks and
micro-batches as verl's dynamic batching does (relibra_verl.routing.loads).

History: `eplb-history` plans a batch on the previous batch's loads: the warm-up draw for the first
resampled step, the last batch (cyclically) for the first of several shuffled steps. `eplb-periodic`
rebalances every `--eplb-interval` micro-batches from the last `--eplb-window` micro-batches of loads
(defaults: vLLM's EPLB, relibra_verl.sim.baselines), starting from the same history. With one shuffled
batch there is no previous batch, and both are left out with a note rather than faked. With `--model`,
`eplb-oracle` keeps its previous placement on a step where rebalancing does not repay its migration.

Step time (relibra_verl.sim): with `--model PRESET` each strategy's plans go through the cost model of
`--profile NAME|PATH` and the report adds step time and throughput vs `megatron` and vs `ideal`. The relibra
planners then get the cost model's `min_replica_tokens` / `max_copies_per_owner` (time-aware planning)
unless given, and the report shows relibra's step time without them too. `--synthetic --seqs N` replaces
`--trace` by the calibrated generator (relibra_verl.sim.synth): one fresh batch of N sequences per step plus
a warm-up batch for eplb-history, drifting between steps. `--plot PATH` writes a PNG.

Whole trainer step (relibra_verl.sim.passes): `--passes update,logprob,ref` adds the old-log-prob and
reference forward passes over the same batch, split by `--logprob-tokens-per-rank`, and reports each
strategy's whole step, relibra's with its forward passes balanced and unbalanced. The default, `update`,
reports the update pass alone, as before; with forward passes eplb-oracle weighs a move against the gain
of every pass.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

from relibra_verl.errors import UsageError
from relibra_verl.planner.relibra import ReorderConfig, ReplicationConfig
from relibra_verl.planner.strategies import DEFAULT_STRATEGIES, STRATEGIES, StrategyResult, run_strategy
from relibra_verl.planner.types import PlanError, Topology
from relibra_verl.routing.loads import count_loads, form_batch, select_sequences, split_micro_batches
from relibra_verl.routing.trace import Trace, load_trace
from relibra_verl.sim.baselines import VLLM_INTERVAL, VLLM_WINDOW, PeriodicSchedule, run_eplb_oracle, run_eplb_periodic


@dataclasses.dataclass
class ReplayRun:
    """Per strategy, one StrategyResult per measured step; counts [M, L, G, E] per step."""

    topo: Topology
    counts: list[np.ndarray]
    results: dict[str, list[StrategyResult]]
    notes: list[str]
    model: object = None          # relibra_verl.sim.presets.ModelPreset with --model
    profile: object = None        # relibra_verl.sim.profiles.HardwareProfile with --model
    limits: dict = dataclasses.field(default_factory=dict)   # the relibra planner's replica limits
    num_groups: int = 1
    seq_lens: np.ndarray | None = None                         # [S] all steps' sequence lengths
    untimed: dict = dataclasses.field(default_factory=dict)  # relibra planners without time-aware limits
    batches: list | None = None                                # the measured batches (Trace per step)
    replication: ReplicationConfig | None = None               # the relibra planner's configuration


def add_replay_arguments(p) -> None:
    """Flags shared by every command that replays traces through the planners."""
    p.add_argument("--trace", action="append", default=None, metavar="PATH|bundled:NAME",
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
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help="comma-separated subset of: " + ", ".join(STRATEGIES) + " (default: all but relibra-locality)")
    p.add_argument("--min-replica-tokens", type=int, default=None, metavar="N",
                   help="relibra: a replica must carry at least N routed pairs (default 1; with --model: from the cost model)")
    p.add_argument("--max-copies-per-owner", type=int, default=None, metavar="N",
                   help="relibra: replicas one rank may send per micro-batch and layer (default unlimited; "
                        "with --model: from the cost model)")
    p.add_argument("--num-groups", type=int, default=None, metavar="N",
                   help="expert groups of the model, for EPLB's hierarchical mode (default 1: global EPLB; "
                        "with --model: the preset's)")
    p.add_argument("--eplb-window", type=int, default=VLLM_WINDOW, metavar="N",
                   help=f"eplb-periodic: micro-batches of past loads EPLB plans from (default {VLLM_WINDOW}, vLLM's window_size)")
    p.add_argument("--eplb-interval", type=int, default=VLLM_INTERVAL, metavar="N",
                   help=f"eplb-periodic: micro-batches between rebalances (default {VLLM_INTERVAL}, vLLM's step_interval)")
    p.add_argument("--locality-min-gain", type=float, default=None, metavar="F",
                   help="relibra-locality: keep verl's data placement unless co-placing lowers the busiest "
                        "node's cross-node pairs by at least the fraction F (default: LocalityConfig's)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")


def add_timing_arguments(p) -> None:
    """Step-time flags (relibra_verl.sim)."""
    p.add_argument("--model", default=None, metavar="PRESET",
                   help="model preset for step time: qwen3-30b-a3b, qwen3-235b-a22b, deepseek-v3, deepseek-v2-lite")
    p.add_argument("--profile", default="h100-ib400", metavar="NAME|PATH",
                   help="hardware profile: h100-ib400 (default), h800-ib400, or a JSON/YAML file")
    p.add_argument("--synthetic", action="store_true", help="synthetic routing of --model instead of --trace")
    p.add_argument("--seqs", type=int, default=None, metavar="N", help="--synthetic: sequences per step")
    p.add_argument("--mean-len", type=float, default=None, metavar="T",
                   help="--synthetic: mean tokens per sequence (default 1500, capped by --tokens-per-rank)")
    p.add_argument("--online-copies", action="store_true",
                   help="replica weights on the critical path (online planning, UltraEP) instead of sent ahead")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG: imbalance per micro-batch, throughput bars")
    p.add_argument("--passes", default="update", metavar="P[,P]",
                   help="passes of the trainer step to time: update (forward + backward, the default), logprob (old "
                        "log-probs, forward only), ref (reference model, forward only); e.g. update,logprob,ref")
    p.add_argument("--logprob-tokens-per-rank", type=int, default=None, metavar="T",
                   help="token budget per rank per micro-batch of the logprob and ref passes (verl's "
                        "log_prob_max_token_len_per_gpu; default: --tokens-per-rank)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="replay routing traces through the balancing strategies",
                              description=__doc__.split("\n\n")[0])
    add_replay_arguments(p)
    add_timing_arguments(p)
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


def synthetic_batches(args, model) -> tuple[list[Trace], Trace | None]:
    """--synthetic: one generated batch of --seqs sequences per step, plus the warm-up batch (eplb-history)."""
    from relibra_verl.sim.synth import RoutingGenerator, params_for

    if args.seqs is None or args.seqs < 1:
        raise UsageError("--synthetic needs --seqs N >= 1 (sequences per step)")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    over = {"max_len": args.tokens_per_rank}
    base = params_for(model)
    over["mean_len"] = min(args.mean_len or base.mean_len, args.tokens_per_rank / 2)
    gen = RoutingGenerator(model, seed=args.seed, params=params_for(model, **over))
    bar = Progress(args.steps + 1, "generate", enabled=not args.no_progress)
    draws = []
    for i in range(args.steps + 1):
        draws.append(gen.batch(args.seqs))
        bar.update(i + 1)
    bar.close()
    return draws[1:], draws[0]


class Progress:
    """A one-line progress bar on stderr, drawn only on a terminal and for runs over ~2 s."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label = max(total, 1), label
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.shown = False

    def update(self, done: int, what: str = "") -> None:
        if not self.enabled or (not self.shown and time.perf_counter() - self.t0 < 2.0 and done < self.total):
            return
        self.shown = True
        n = int(30 * done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * n}{'.' * (30 - n)}] {done}/{self.total} {what:<24}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


# strategies whose planner runs numba-compiled loops (compiled on first use, or loaded from numba's cache)
_COMPILED_STRATEGIES = ("megatron", "relibra-reorder", "relibra-replicate", "relibra", "relibra-locality")


def _compile_planner(name, counts, topo, replication, reorder) -> None:
    """Plan the first micro-batch of counts [M, L, G, E] with strategy `name`, untimed, so that numba's
    compile of the loops it calls (a minute on a cold cache) is not counted in the strategy's plan ms."""
    one = np.ascontiguousarray(counts[:1], dtype=np.int64)
    L, E = one.shape[1], one.shape[3]
    hint = np.tile(np.arange(E, dtype=np.int64) % topo.num_nodes, (L, 1)) if name == "relibra-locality" else None
    run_strategy(name, one, topo, replication=replication, reorder=reorder, node_of_expert=hint)


def run_strategies(strategies, counts, history, topo, num_groups, replication, progress=None,
                   reorder: ReorderConfig = ReorderConfig(), step_seconds=None,
                   schedule: PeriodicSchedule = PeriodicSchedule(), place_data=None) -> dict[str, list[StrategyResult]]:
    """Every strategy on every step's counts [M, L, G, E]; placements carried from step to step.
    history: the batches before the run (the warm-up draw), or empty (shuffled steps: the last batch,
    cyclically). step_seconds(result, prev_placement): eplb-oracle's keep-or-rebalance cost (None: it
    rebalances every step). schedule: eplb-periodic's window and interval. place_data: relibra-locality's
    data placement (relibra_verl.sim.locality.LocalityPlacer; None: verl's, relibra-locality plans as relibra)."""
    results: dict[str, list[StrategyResult]] = {}
    before = list(history) if history else [counts[-1]]
    done = 0
    t0 = time.perf_counter()
    for name in strategies:
        if name in _COMPILED_STRATEGIES:
            _compile_planner(name, counts[0], topo, replication, reorder)
    if time.perf_counter() - t0 > 5.0:
        print(f"relibra-verl: compiled the planner in {time.perf_counter() - t0:.0f} s (numba, first run only: "
              "cached for later runs; not counted in plan ms)", file=sys.stderr)
    for name in strategies:
        if name in ("eplb-periodic", "eplb-oracle"):
            results[name] = (run_eplb_periodic(counts, before, topo, num_groups, schedule) if name == "eplb-periodic"
                             else run_eplb_oracle(counts, topo, num_groups, step_seconds))
            done += len(counts)
            if progress is not None:
                progress.update(done, name)
            continue
        prev = None
        per_step = []
        for i, c in enumerate(counts):
            hist = counts[i - 1] if i > 0 else before[-1]
            node_of_expert = placed = None
            if name == "relibra-locality" and place_data is not None:
                c, node_of_expert, placed = place_data(i, prev)
            res = run_strategy(name, c, topo, history_counts=hist, prev_placement=prev,
                               num_groups=num_groups, replication=replication, reorder=reorder,
                               node_of_expert=node_of_expert)
            res.data = placed
            prev = res.placement
            per_step.append(res)
            done += 1
            if progress is not None:
                progress.update(done, f"{name} step {i + 1}")
        results[name] = per_step
    return results


def resolve_model(args):
    """The --model preset (None without it); checks --synthetic needs it."""
    from relibra_verl.sim.presets import get_preset

    model = get_preset(args.model) if getattr(args, "model", None) else None
    if getattr(args, "synthetic", False):
        if model is None:
            raise UsageError("--synthetic needs --model PRESET")
        if args.trace:
            raise UsageError("--synthetic and --trace exclude each other")
    elif not args.trace:
        raise UsageError("give --trace PATH|bundled:NAME (repeatable) or --synthetic --model PRESET")
    return model


def replication_config(args, model, profile, topo: Topology) -> tuple[ReplicationConfig, ReorderConfig, dict]:
    """The relibra planner's configuration: the flags, or with --model the cost model's (time-aware, as the
    verl trainer plans: sim.planning.planner_configs), with the reorder's NIC-aware node assignment on and
    the copy cap of the prefetch window; --min-replica-tokens / --max-copies-per-owner override."""
    from relibra_verl.sim.planning import max_copies_per_owner, planner_configs

    src = "flags"
    if model is None:
        replication, reorder = ReplicationConfig(), ReorderConfig()
    else:
        replication, reorder = planner_configs(model, profile, topo.num_nodes, topo.ranks_per_node,
                                               prefetch=not args.online_copies, reorder_inter_node_share=None)
        replication = dataclasses.replace(replication, max_copies_per_owner=max_copies_per_owner(model, profile, args.tokens_per_rank))
        if args.min_replica_tokens is None:
            src = "cost model"
    if args.min_replica_tokens is not None:
        replication = dataclasses.replace(replication, min_replica_tokens=args.min_replica_tokens)
    if args.max_copies_per_owner is not None:
        replication = dataclasses.replace(replication, max_copies_per_owner=args.max_copies_per_owner)
    limits = {"min_replica_tokens": replication.min_replica_tokens, "max_copies_per_owner": replication.max_copies_per_owner,
              "replica_overhead_pairs": replication.replica_overhead_pairs,
              "copy_cost_pairs": round(replication.copy_cost_pairs, 1),
              "move_cost_pairs": round(reorder.move_cost_pairs, 1), "rank_move_cost_pairs": round(reorder.rank_move_cost_pairs, 1),
              "inter_node_share": round(replication.inter_node_share, 3) if model is not None else 0.0, "source": src}
    return replication, reorder, limits


def replay(args) -> ReplayRun:
    """Load traces (or generate them), form batches, count loads and run every requested strategy on every step."""
    from relibra_verl.sim.profiles import load_profile

    strategies = parse_strategies(args.strategies)
    model = resolve_model(args)
    profile = load_profile(args.profile) if model is not None else None
    notes = []
    if model is not None and getattr(args, "synthetic", False):
        batches, warmup = synthetic_batches(args, model)
        E = model.num_experts
    else:
        traces = [load_trace(spec) for spec in args.trace]
        E = traces[0].num_experts
        if model is not None and E != model.num_experts:
            raise UsageError(f"{traces[0].name}: the trace has {E} experts per layer but preset {model.name} has "
                             f"{model.num_experts}")
        if model is not None and traces[0].num_layers != model.num_moe_layers:
            raise UsageError(f"{traces[0].name}: the trace has {traces[0].num_layers} MoE layers but preset "
                             f"{model.name} has {model.num_moe_layers}")
        long_seqs = sum(int((t.seq_lens() > args.tokens_per_rank).sum()) for t in traces)
        if args.resample is not None and long_seqs:
            notes.append(f"{long_seqs} recorded sequence(s) longer than --tokens-per-rank {args.tokens_per_rank} are not drawn")
        batches, warmup = build_batches(traces, args)
    try:
        topo = Topology(E, args.ep, args.gpus_per_node, args.replica_slots)
    except PlanError as exc:
        raise UsageError(str(exc)) from None
    counts = [count_loads(b, split_micro_batches(b.seq_lens(), args.ep, args.tokens_per_rank)) for b in batches]
    history = [count_loads(warmup, split_micro_batches(warmup.seq_lens(), args.ep, args.tokens_per_rank))] if warmup else []
    for name in ("eplb-periodic", "eplb-history"):
        if name in strategies and warmup is None and len(counts) == 1:
            strategies.remove(name)
            notes.append(f"{name} left out: one shuffled batch has no previous batch (use --steps >= 2 or --resample)")
    try:
        schedule = PeriodicSchedule(args.eplb_window, args.eplb_interval)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    replication, reorder, limits = replication_config(args, model, profile, topo)
    num_groups = args.num_groups if args.num_groups is not None else (model.num_expert_groups if model else 1)
    seq_lens = np.concatenate([b.seq_lens() for b in batches])
    step_seconds = None
    if model is not None:
        from relibra_verl.sim.report import mean_context, step_cost

        ctx = mean_context(seq_lens)
        step_seconds = lambda res, prev: step_cost("eplb-oracle", res, prev, model, profile, topo,  # noqa: E731
                                                   prefetch=not args.online_copies, mean_context=ctx).total_s
        forward_passes = len(check_passes(args)) - 1
        if forward_passes:   # the oracle weighs a move against the whole step's gain (sim.passes)
            step_seconds = oracle_whole_step(step_seconds, forward_passes, model, profile, topo,
                                             prefetch=not args.online_copies, mean_context=ctx)
    bar = Progress(len(strategies) * len(counts), "plan", enabled=not getattr(args, "no_progress", False))
    place_data = None
    if "relibra-locality" in strategies:
        from relibra_verl.planner.locality import LocalityConfig
        from relibra_verl.sim.locality import LocalityPlacer

        gain = getattr(args, "locality_min_gain", None)
        config = LocalityConfig() if gain is None else LocalityConfig(min_gain=gain)
        place_data = LocalityPlacer(batches, topo, args.tokens_per_rank, config)
    results = run_strategies(strategies, counts, history, topo, num_groups, replication, bar, reorder,
                             step_seconds, schedule, place_data)
    run = ReplayRun(topo, counts, results, notes)
    run.model, run.profile, run.limits, run.num_groups = model, profile, limits, num_groups
    run.seq_lens = seq_lens
    run.batches, run.replication = batches, replication
    if model is not None and limits["source"] == "cost model" and any(n.startswith("relibra") for n in strategies):
        # the same planners planning token counts only (no limits, overheads or move costs): what time-aware
        # planning changes
        plain = ReplicationConfig(min_replica_tokens=1, max_copies_per_owner=None)
        names = [n for n in strategies if n in ("relibra", "relibra-replicate", "relibra-reorder")]
        run.untimed = run_strategies(names, counts, history, topo, num_groups, plain, bar)
    bar.close()
    return run


def nic_imbalance(result: StrategyResult, node_of_rank) -> np.ndarray:
    """[M, L] the busiest InfiniBand NIC over the mean: per rank the busier direction of its NIC in the
    dispatch all-to-all (the pairs it receives from other nodes, or those it sends to them), max over ranks,
    over the mean per rank of the pairs that cross nodes (1.0 where nothing crosses). What sets the
    all-to-all's time over InfiniBand; its send side is the data's (which rank holds which tokens) and the
    placement's, replication cannot lower it."""
    nodes = np.asarray(node_of_rank)
    cross = np.asarray(result.traffic, dtype=np.float64) * (nodes[:, None] != nodes[None, :])
    recv, sent = cross.sum(2), cross.sum(3)                                  # [M, L, G]
    mean = recv.mean(-1)
    return np.where(mean > 0, np.maximum(recv, sent).max(-1) / np.where(mean > 0, mean, 1), 1.0)


def _percentiles(x: np.ndarray) -> dict:
    return {"p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)), "max": float(x.max())}


def summarize(run: ReplayRun) -> dict[str, dict]:
    """Per strategy: imbalance p50/p95/max over all (step, micro-batch, layer), replicas, moves, plan time;
    with several nodes also the busiest InfiniBand NIC (nic_imbalance)."""
    out = {}
    for name, steps in run.results.items():
        imb = np.concatenate([r.imbalance().reshape(-1) for r in steps])
        out[name] = {
            "imbalance": _percentiles(imb),
            "replicas_per_microbatch_layer": float(np.mean([r.replicas.sum((0, 2)).mean() / r.replicas.shape[0] for r in steps])),
            "moved_experts_per_step": float(np.mean([r.moved_experts.sum() for r in steps])),
            "plan_ms": float(np.mean([r.plan_ms for r in steps])),
        }
        cross = np.sum([r.inter_node_pairs(run.topo.node_of_rank) for r in steps], axis=0)
        out[name]["inter_node_fraction"] = float(cross[0] / cross[1]) if cross[1] else 0.0
        placed = [r.data for r in steps if r.data is not None]
        if placed:
            out[name]["data_placement"] = {"fell_back_steps": sum(p.fell_back for p in placed),
                                           "reasons": sorted({p.reason for p in placed if p.reason}),
                                           "inter_node_fraction_verl": float(np.mean([p.verl_fraction for p in placed])),
                                           "nic_gain": float(np.mean([p.nic_gain for p in placed])),
                                           "plan_ms": float(np.mean([p.plan_ms for p in placed]))}
        if run.topo.num_nodes > 1:
            out[name]["nic_imbalance"] = _percentiles(np.concatenate(
                [nic_imbalance(r, run.topo.node_of_rank).reshape(-1) for r in steps]))
    return out


def print_table(summary: dict[str, dict], header: str, file=None) -> None:
    file = file or sys.stdout  # resolved at call time (tests swap sys.stdout)
    nic = all("nic_imbalance" in s for s in summary.values())
    print(header, file=file)
    if nic:
        print("NIC = the busiest InfiniBand NIC (pairs a rank receives from or sends to other nodes, the busier) over the\n"
              "      mean pairs per rank that cross nodes, p50 / p95", file=file)
    print(f"{'strategy':<19}{'p50':>8}{'p95':>8}{'max':>8}  {'replicas/mb/layer':>17}  {'moved/step':>10}  {'plan ms':>8}"
          + (f"  {'NIC p50':>8}{'NIC p95':>8}{'x-node':>8}" if nic else ""), file=file)
    for name, s in summary.items():
        i = s["imbalance"]
        print(f"{name:<19}{i['p50']:>8.3f}{i['p95']:>8.3f}{i['max']:>8.3f}  {s['replicas_per_microbatch_layer']:>17.1f}"
              f"  {s['moved_experts_per_step']:>10.0f}  {s['plan_ms']:>8.1f}"
              + (f"  {s['nic_imbalance']['p50']:>8.3f}{s['nic_imbalance']['p95']:>8.3f}{s['inter_node_fraction']:>8.3f}"
                 if nic else ""), file=file)
    for name, s in summary.items():
        if "data_placement" in s:
            d = s["data_placement"]
            print(f"{name}: x-node = share of routed pairs crossing nodes ({d['inter_node_fraction_verl']:.3f} on verl's "
                  f"data placement); fell back to verl's on {d['fell_back_steps']} step(s)"
                  + (f" ({'; '.join(d['reasons'])})" if d["reasons"] else "") + f"; data planner {d['plan_ms']:.0f} ms",
                  file=file)


def config_dict(args, run: ReplayRun) -> dict:
    c = run.counts[0]
    cfg = {
        "traces": args.trace if args.trace else [f"synthetic:{args.model}"], "ep": args.ep,
        "gpus_per_node": args.gpus_per_node, "nodes": run.topo.num_nodes,
        "replica_slots": args.replica_slots, "tokens_per_rank": args.tokens_per_rank, "resample": args.resample,
        "steps": args.steps, "seed": args.seed, "num_experts": run.topo.E, "moe_layers": int(c.shape[1]),
        "micro_batches_per_step": [int(x.shape[0]) for x in run.counts],
        "routed_pairs_per_step": [int(x.sum()) for x in run.counts],
        "min_replica_tokens": run.limits.get("min_replica_tokens", 1),
        "max_copies_per_owner": run.limits.get("max_copies_per_owner"),
        "num_groups": run.num_groups,
        "eplb_window": args.eplb_window, "eplb_interval": args.eplb_interval,
        "notes": run.notes,
    }
    if run.model is not None:
        cfg.update(model=run.model.name, profile=run.profile.name, synthetic=bool(args.synthetic), seqs=args.seqs,
                   replica_limits_from=run.limits["source"], replica_copies="critical path" if args.online_copies else "sent ahead")
    return cfg


def timing_report(args, run: ReplayRun) -> dict | None:
    """simulate_timing over the run (None without --model), plus relibra without time-aware limits."""
    if run.model is None:
        return None
    from relibra_verl.sim.report import mean_context, simulate_timing

    ctx = mean_context(run.seq_lens)
    timing = simulate_timing(run.results, run.model, run.profile, run.topo, mean_context=ctx, prefetch=not args.online_copies)
    if run.untimed:
        plain = simulate_timing({**run.results, **run.untimed}, run.model, run.profile, run.topo, mean_context=ctx,
                                prefetch=not args.online_copies)["strategies"]
        timing["time_aware"] = {n: {"step_time_s": timing["strategies"][n]["step_time_s"],
                                    "step_time_s_without": plain[n]["step_time_s"],
                                    "replicas_per_microbatch_layer": _replicas(run.results[n]),
                                    "replicas_per_microbatch_layer_without": _replicas(run.untimed[n])}
                                for n in run.untimed}
    return timing


def _replicas(steps) -> float:
    return float(np.mean([r.replicas.sum((0, 2)).mean() / r.replicas.shape[0] for r in steps]))


def check_passes(args) -> tuple[str, ...]:
    """--passes and --logprob-tokens-per-rank, checked before any planning."""
    from relibra_verl.sim.passes import parse_passes

    passes = parse_passes(getattr(args, "passes", "update"))
    if passes != ("update",) and getattr(args, "model", None) is None:
        raise UsageError(f"--passes {','.join(passes)} needs --model PRESET (the passes are timed by the cost model)")
    tokens = getattr(args, "logprob_tokens_per_rank", None)
    if tokens is not None and tokens < 1:
        raise UsageError(f"--logprob-tokens-per-rank must be >= 1, got {tokens}")
    return passes


def oracle_whole_step(update_seconds, forward_passes: int, model, profile, topo, *, prefetch: bool, mean_context: float):
    """eplb-oracle's keep-or-rebalance price with forward-only passes in the step: the update's step time
    plus `forward_passes` forward passes of the same placement over the update's micro-batches (a placement's
    gain is earned in every pass; the forward split's own counts are not known to the oracle's loop)."""
    from relibra_verl.sim.passes import forward_cost

    nodes = np.asarray(topo.node_of_rank)

    def seconds(res, prev) -> float:
        return update_seconds(res, prev) + forward_passes * forward_cost(res, nodes, model, profile, prefetch=prefetch,
                                                                         mean_context=mean_context).total_s
    return seconds


def whole_step_report(args, run: ReplayRun) -> dict | None:
    """The whole trainer step (relibra_verl.sim.passes) with --passes beyond the update, else None."""
    passes = check_passes(args)
    if passes == ("update",) or run.model is None:
        return None
    from relibra_verl.sim.passes import forward_replication, plan_forward, whole_step_timing
    from relibra_verl.sim.report import mean_context

    tokens = args.logprob_tokens_per_rank or args.tokens_per_rank
    forward = None
    if any(p != "update" for p in passes):
        same = tokens == args.tokens_per_rank
        longest = int(max(b.seq_lens().max() for b in run.batches))
        if tokens < longest:
            raise UsageError(f"--logprob-tokens-per-rank {tokens} is less than the longest sequence of the batches "
                             f"({longest} tokens; verl's dynamic batching refuses a sequence longer than the budget)")
        counts = run.counts if same else [count_loads(b, split_micro_batches(b.seq_lens(), args.ep, tokens))
                                          for b in run.batches]
        replication = run.replication
        if run.limits["source"] == "cost model":   # time-aware: the forward-only costs (no flag overrides it)
            replication = forward_replication(replication, run.model, run.profile, run.topo.num_nodes,
                                              run.topo.ranks_per_node, prefetch=not args.online_copies)
        forward = plan_forward(run.results, counts, run.topo, replication, same_split=same)
    out = whole_step_timing(run.results, forward, passes, run.model, run.profile, run.topo,
                            prefetch=not args.online_copies, mean_context=mean_context(run.seq_lens))
    out["logprob_tokens_per_rank"] = tokens
    out["forward_replication"] = ({"min_replica_tokens": replication.min_replica_tokens,
                                   "copy_cost_pairs": round(replication.copy_cost_pairs, 2),
                                   "inter_node_share": round(replication.inter_node_share, 3)}
                                  if forward is not None else None)
    return out


def run(args) -> int:
    check_passes(args)
    result = replay(args)
    summary = summarize(result)
    cfg = config_dict(args, result)
    timing = timing_report(args, result)
    src = " + ".join(args.trace) if args.trace else f"synthetic {args.model} ({args.seqs} seqs/step)"
    header = (f"relibra-verl simulate: {src} | EP {args.ep} on {result.topo.num_nodes} node(s) x "
              f"{args.gpus_per_node} | R={args.replica_slots} | {args.tokens_per_rank} tokens/rank/micro-batch | "
              f"{args.steps} step(s), micro-batches {cfg['micro_batches_per_step']}, layers {cfg['moe_layers']}\n"
              "imbalance = max / mean routed pairs per rank, over every (step, micro-batch, MoE layer)")
    print_table(summary, header)
    for note in result.notes:
        print(f"note: {note}")
    if timing is not None:
        from relibra_verl.sim.report import format_timing

        for name, t in timing["strategies"].items():
            summary[name].update({k: t[k] for k in ("step_time_s", "throughput_vs_megatron", "throughput_vs_ideal")})
        print()
        print(format_timing(timing))
        lim = result.limits
        for name, t in timing.get("time_aware", {}).items():
            print(f"time-aware planning ({name}): {t['step_time_s']:.4f} s/step with min_replica_tokens="
                  f"{lim['min_replica_tokens']}, max_copies_per_owner={lim['max_copies_per_owner']}, "
                  f"replica_overhead_pairs={lim['replica_overhead_pairs']}, copy_cost_pairs={lim['copy_cost_pairs']}, "
                  f"move_cost_pairs={lim['move_cost_pairs']}, "
                  f"rank_move_cost_pairs={lim['rank_move_cost_pairs']}, "
                  f"inter_node_share={lim['inter_node_share']} "
                  f"({t['replicas_per_microbatch_layer']:.1f} replicas/mb/layer); {t['step_time_s_without']:.4f} s/step "
                  f"without ({t['replicas_per_microbatch_layer_without']:.1f})")
    whole = whole_step_report(args, result)
    if whole is not None:
        from relibra_verl.sim.passes import format_whole_step

        print()
        print(format_whole_step(whole, timing["model"], timing["profile"], whole["logprob_tokens_per_rank"]))
        timing["whole_step"] = whole
    if args.plot:
        if timing is None:
            raise UsageError("--plot needs --model PRESET (the throughput bars come from the cost model)")
        from relibra_verl.sim.report import plot_report

        try:
            plot_report(result.results, timing, args.plot, title=f"{src} | EP {args.ep} ({result.topo.num_nodes} x "
                        f"{args.gpus_per_node}) | {timing['model']} on {timing['profile']}")
        except OSError as exc:
            raise UsageError(f"{args.plot}: cannot write the plot ({exc.strerror or exc})") from None
        print(f"plot: {args.plot}")
    if args.json:
        report = {"config": cfg, "strategies": summary}
        if timing is not None:
            report["timing"] = timing
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
