"""The trainer's whole step: the update pass plus the forward-only passes over the same batch.

In a GRPO step verl runs, before the update, the actor's old-log-prob forward (`logprob`) and the reference
model's forward (`ref`, a separate model without optimizer) over the same batch; with routing replay both
route as the rollout did, so their loads are known like the update's. The forward-only passes have their
own micro-batch split (verl's `log_prob_max_token_len_per_gpu`, `--logprob-tokens-per-rank`), the same for
both (the ref's `log_prob_*` settings usually mirror the actor's).

What each pass costs (relibra_verl.sim.cost's terms):
  update   forward + backward, as cost.batch_cost prices it. With the logprob pass in the step, EPLB's
           redundant copies already hold this step's actor weights (the logprob pass fetched them into
           their dedicated buffers), so the update pays only their gradient reduce.
  logprob  forward only: dispatch + combine, expert GEMMs, the non-MoE part, dense layers and the LM head
           forward; relibra's per-micro-batch replicas fetch their weights once (no backward re-copy, no
           gradient); EPLB's redundant copies fetch the actor's weights (they changed at the last
           optimizer step), streamed beside micro-batch 0's forward as in the update.
  ref      forward only, the same terms. The reference weights never change: EPLB's redundant copies are
           fetched only where a slot's expert changed; a reordering moves weights only (no optimizer state).

Placement: the step's placement is applied once before the first pass, so its migration (the actor's
optimizer state) is paid once per step for all passes. Variants per relibra strategy:
  balanced    (forward passes balanced) logprob and ref run on the step's placement with replicas planned
              for their own split, with a forward-only time-aware configuration (forward_replication); the
              ref model follows the actor's placement (weights-only migration) and shares its replica plan.
  unbalanced  relibra balancing only the update: the placement is applied at the update, so logprob runs on
              the placement in force before it (the previous step's; on the first step its own, as in a
              steady state), ref on Megatron's layout (the ref model has no relibra), both without replicas.
EPLB baselines run every pass on the placement they use for the step; megatron on its own layout.
The ideal's forward pass is the least balanced forward cost over every strategy's forward results (as
report.ideal_costs does for the update), so no strategy's pass, and no whole step, is below it.

Shapes: M' micro-batches of the forward split, L MoE layers, G EP ranks, E experts, P physical slots.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from relibra_verl.errors import UsageError
from relibra_verl.planner.relibra import ReplicationConfig, plan_relibra
from relibra_verl.planner.strategies import StrategyResult, eplb_result, plan_outcome, run_strategy
from relibra_verl.planner.types import Topology
from relibra_verl.sim.cost import (TERMS, BatchCost, _redundant_sync, batch_cost, expert_gemm_coeffs,
                                   migration_time, redundant_copy_seconds)
from relibra_verl.sim.overheads import INT64, relibra_runtime_seconds
from relibra_verl.sim.presets import ModelPreset
from relibra_verl.sim.profiles import HardwareProfile
from relibra_verl.sim.report import BASE, IDEAL, ideal_costs, replica_sends, strategy_costs

PASSES = ("update", "logprob", "ref")
FORWARD_PASSES = ("logprob", "ref")
RELIBRA = ("relibra", "relibra-reorder", "relibra-replicate")


def parse_passes(text: str) -> tuple[str, ...]:
    """`update,logprob,ref` -> the passes in step order; the update is required (relibra's placement is
    planned for it)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in PASSES]
    if unknown or not names:
        raise UsageError(f"unknown pass {unknown[0] if unknown else '(none)'}; choose from {', '.join(PASSES)}")
    if "update" not in names:
        raise UsageError("--passes must include update (the placement is planned for the update)")
    return tuple(p for p in PASSES if p in names)


# ---------------------------------------------------------------- planning the forward-only passes

def forward_replication(update: ReplicationConfig, model: ModelPreset, profile: HardwareProfile, num_nodes: int,
                        gpus_per_node: int, *, prefetch: bool = True) -> ReplicationConfig:
    """The replication planner's time-aware configuration for a forward-only pass: the update's
    (relibra_verl.planner.configs) with a replica's costs and a pair's worth counted forward only. A replica
    costs one weight copy (w; sent ahead, its contention share c) and one forward GEMM call (a); a routed
    pair is worth its forward GEMM (b) and its bytes in the 2 forward all-to-alls (dispatch, combine) on
    the busier link. So min_replica_tokens = ceil(w c / pair), copy_cost_pairs = w c / b,
    inter_node_share = ib / (b + ib); replica_overhead_pairs (a / b) and max_copies_per_owner (the forward
    window) are the update's."""
    a, b = expert_gemm_coeffs(model, profile)
    w = model.expert_params * profile.weight_bytes_per_param / (profile.nvlink_p2p_GBps * 1e9)
    exposed = w * (profile.replica_contention_share if prefetch else 1.0)
    bytes_per_pair = 2.0 * model.hidden * profile.act_bytes
    ib = bytes_per_pair / (profile.ib_a2a_GBps * 1e9)
    nvl = bytes_per_pair / (profile.nvlink_a2a_GBps * 1e9)
    N, g = max(1, num_nodes), max(1, gpus_per_node)
    pair = b + max((N - 1) / N * ib, (g - 1) / (N * g) * nvl)
    return dataclasses.replace(update, min_replica_tokens=max(1, math.ceil(exposed / pair)),
                               copy_cost_pairs=exposed / b, inter_node_share=ib / (b + ib))


def _on_placement(counts: np.ndarray, topo: Topology, placement: np.ndarray | None,
                  replication: ReplicationConfig, replicas: bool) -> StrategyResult:
    """counts [M', L, G, E] run on a relibra placement [L, E] (None: Megatron's), with replicas planned for
    these micro-batches (replicas=True) or none."""
    t = topo if replicas else dataclasses.replace(topo, replica_slots=0)
    plan = plan_relibra(counts, t, placement, mode="replicate", replication=replication)
    rank_tokens, traffic, calls = plan_outcome(plan, counts)
    M, L, G, _ = counts.shape
    res = StrategyResult("", rank_tokens, traffic, (plan.replica_expert >= 0).sum(-1), np.zeros((L, G), np.int64),
                         np.zeros(L, np.int64), plan.expert_at_home, 0.0, plan, calls)
    res.replica_sends = replica_sends(plan)      # copies charged at the busier of receivers and senders
    return res


@dataclasses.dataclass
class ForwardRun:
    """The forward-only passes of every step: for each variant ("balanced", "unbalanced") and strategy, one
    (logprob result, ref result) per step, StrategyResults over the forward split's counts [M', L, G, E].
    The ref's result is the placement the ref model runs on; "unbalanced" holds the relibra strategies
    only (the others have one way to run)."""

    counts: list[np.ndarray]
    results: dict[str, dict[str, list[tuple[StrategyResult, StrategyResult]]]]


def plan_forward(update_results: dict[str, list[StrategyResult]], counts: list[np.ndarray], topo: Topology,
                 replication: ReplicationConfig, same_split: bool) -> ForwardRun:
    """Every strategy's forward passes on each step's forward counts (counts [M', L, G, E] per step).
    same_split: the forward split equals the update's (its results are reused where nothing is planned)."""
    balanced, unbalanced = {}, {}
    for name, steps in update_results.items():
        per, per_unb = [], []
        for i, (res, c) in enumerate(zip(steps, counts)):
            prev = steps[i - 1].placement if i > 0 else None
            if name in ("relibra", "relibra-replicate"):
                fwd = _on_placement(c, topo, res.placement, replication, replicas=True)
            elif name == "relibra-reorder":
                fwd = res if same_split else _on_placement(c, topo, res.placement, replication, replicas=False)
            elif same_split:
                fwd = res
            elif name.startswith("eplb"):
                fwd = eplb_result(np.asarray(c, dtype=np.int64), topo, res.placement, prev)
            else:   # megatron, ideal: the data's split only
                fwd = run_strategy(name, c, topo)
            fwd.name = name
            per.append((fwd, fwd))
            if name in RELIBRA:
                # the placement in force before this step's: the previous step's; before the first step, its
                # own (the move away from Megatron's layout is once per run: the steady state favours this variant)
                in_force = None if name == "relibra-replicate" else (prev if i > 0 else res.placement)
                logprob = _on_placement(c, topo, in_force, replication, replicas=False)
                ref = _on_placement(c, topo, None, replication, replicas=False)
                logprob.name = ref.name = name
                per_unb.append((logprob, ref))
        balanced[name] = per
        if per_unb:
            unbalanced[name] = per_unb
    return ForwardRun(counts, {"balanced": balanced, "unbalanced": unbalanced})


# ---------------------------------------------------------------- costs

def forward_cost(result, node_of_rank, model: ModelPreset, profile: HardwareProfile, *, prefetch: bool = True,
                 mean_context: float = 1024.0, balanced: bool = False) -> BatchCost:
    """Cost of a forward-only pass over a StrategyResult (rank_tokens [M', L, G], traffic [M', L, G, G],
    replicas [M', L, G], calls): cost.batch_cost's forward terms (dispatch + combine, expert GEMMs, non-MoE,
    relibra's replica weight fetch), the dense layers and LM head forward, no backward. EPLB's redundant
    copies and any migration are the caller's (whole_step), they depend on the pass."""
    c = batch_cost(result.rank_tokens, result.traffic, result.replicas, np.zeros(np.shape(result.rank_tokens)[1]),
                   node_of_rank, model, profile, prefetch=prefetch, mean_context=mean_context, balanced=balanced,
                   replica_sends=getattr(result, "replica_sends", None), calls=getattr(result, "calls", None),
                   redundant=getattr(result, "redundant", None))
    zeros = {t: np.zeros_like(c.fwd[t]) for t in TERMS}
    return BatchCost(c.fwd, zeros, c.per_micro_batch_rest_s / (1.0 + profile.bwd_compute_factor), 0.0, 0.0)


def redundant_sync(copy_s: np.ndarray, cost: BatchCost, profile: HardwareProfile, *, weights: bool, grads: bool) -> float:
    """Exposed seconds of EPLB's redundant-copy sync beside a pass (cost.BatchCost of the pass; copy_s [L],
    redundant_copy_seconds): the weight fetch (weights) and/or the gradient reduce (grads), with
    cost._redundant_sync's overlap rules."""
    if copy_s is None or not np.any(copy_s):
        return 0.0
    prof = dataclasses.replace(profile, weight_bytes_per_param=profile.weight_bytes_per_param if weights else 0.0,
                               grad_bytes_per_param=profile.grad_bytes_per_param if grads else 0.0)
    return _redundant_sync(np.asarray(copy_s, dtype=np.float64), cost.fwd, cost.bwd, prof)


def changed_redundant(placement: np.ndarray, prev: np.ndarray | None) -> np.ndarray:
    """[L, P] an EPLB placement with the redundant slots that hold the same expert as in `prev` emptied
    (-1): the copies a frozen model (the reference) must fetch. prev None: every copy."""
    placement = np.asarray(placement)
    if prev is None or np.shape(prev) != placement.shape:
        return placement
    return np.where((placement <= -2) & (placement == np.asarray(prev)), -1, placement)


def _weights_only(profile: HardwareProfile) -> HardwareProfile:
    """A migration that moves weights only (the reference model has no optimizer state)."""
    return dataclasses.replace(profile, state_bytes_per_param=profile.weight_bytes_per_param)


@dataclasses.dataclass
class StepPasses:
    """Seconds of one step of one strategy, per pass; migration (actor + ref) and runtime apart."""

    update_s: float
    logprob_s: float = 0.0
    ref_s: float = 0.0
    migration_s: float = 0.0
    runtime_s: float = 0.0
    initial_s: float = 0.0     # first-step costs of a several-step run left out of the steady state

    @property
    def total_s(self) -> float:
        return self.update_s + self.logprob_s + self.ref_s + self.migration_s + self.runtime_s


def _is_eplb(result) -> bool:
    red = getattr(result, "redundant", None)
    placement = getattr(result, "placement", None)
    return red is not None and np.any(red) and placement is not None and (np.asarray(placement) <= -2).any()


def strategy_passes(name: str, update_costs: list[BatchCost], update_results: list, forward: list | None,
                    passes: tuple[str, ...], model: ModelPreset, profile: HardwareProfile, topo, *,
                    prefetch: bool = True, mean_context: float = 1024.0, forward_balanced: bool = True) -> list[StepPasses]:
    """Per step, the passes of strategy `name`: update_costs (report.step_cost of each step's update,
    migration and runtime included), its update results, forward [(logprob, ref) results per step] (None
    without forward passes). forward_balanced: the relibra strategies' forward passes were planned (their
    ref follows the placement, their forward split installs its own plan)."""
    nodes = np.asarray(topo.node_of_rank)
    out = []
    several = len(update_costs) > 1
    for i, (uc, ur) in enumerate(zip(update_costs, update_results)):
        base = uc.total_s - uc.migration_s - uc.runtime_s
        eplb = _is_eplb(ur)
        copy_s = redundant_copy_seconds(ur.placement, nodes, model, profile) if eplb else None
        if eplb and "logprob" in passes:    # the logprob pass fetched the weights; the update reduces gradients
            base += redundant_sync(copy_s, uc, profile, weights=False, grads=True) - uc.redundant_sync_s
        migration = uc.migration_s if uc.initial_migration_s is None else 0.0
        initial = uc.initial_migration_s or 0.0
        sp = StepPasses(base, migration_s=migration, runtime_s=uc.runtime_s, initial_s=initial)
        if forward is not None:
            lp_res, ref_res = forward[i]
            if "logprob" in passes:
                fc = forward_cost(lp_res, nodes, model, profile, prefetch=prefetch, mean_context=mean_context)
                sp.logprob_s = fc.total_s + (redundant_sync(copy_s, fc, profile, weights=True, grads=False) if eplb else 0.0)
            if "ref" in passes:
                fc = forward_cost(ref_res, nodes, model, profile, prefetch=prefetch, mean_context=mean_context)
                prev = update_results[i - 1].placement if i > 0 else None
                ref_extra = 0.0
                if eplb:
                    fresh = changed_redundant(ur.placement, prev)
                    ref_extra += redundant_sync(redundant_copy_seconds(fresh, nodes, model, profile), fc, profile,
                                                weights=True, grads=False)
                if eplb or (name in RELIBRA and forward_balanced):   # the ref model follows the placement
                    ref_extra += migration_time(prev, ur.placement, nodes, model, _weights_only(profile))
                sp.ref_s = fc.total_s
                if several and i == 0:
                    sp.initial_s += ref_extra
                else:
                    sp.migration_s += ref_extra
            M, L = np.shape(lp_res.rank_tokens)[:2]
            if name in RELIBRA and forward_balanced:   # the forward split's loads, agreement and plan (shared by ref)
                sp.runtime_s += sum(relibra_runtime_seconds(M, L, topo.G, topo.E, topo.R, topo.num_nodes, profile).values())
            elif eplb and "ref" in passes and _changed(update_results, i):
                sp.runtime_s += np.size(ur.placement) * INT64 / (profile.h2d_GBps * 1e9)   # the ref model's map
        out.append(sp)
    return out


def _changed(results: list, i: int) -> bool:
    """Step i's placement differs from the previous step's (step 0: from Megatron's layout, always)."""
    return i == 0 or not np.array_equal(np.asarray(results[i - 1].placement), np.asarray(results[i].placement))


def ideal_forward_costs(forward: ForwardRun, model: ModelPreset, profile: HardwareProfile, topo, *,
                        mean_context: float = 1024.0) -> list[BatchCost]:
    """Per step the ideal forward pass: per (micro-batch, layer) and term the least balanced forward cost
    (forward_cost(balanced=True)) over every forward result of every strategy and variant; dense layers and
    head the least too. A lower bound of every forward pass by construction (as report.ideal_costs)."""
    nodes = np.asarray(topo.node_of_rank)
    steps = len(forward.counts)
    out = []
    for i in range(steps):
        cs = [forward_cost(r, nodes, model, profile, mean_context=mean_context, balanced=True)
              for variant in forward.results.values() for per in variant.values() for r in per[i]]
        fwd = {t: np.minimum.reduce([c.fwd[t] for c in cs]) for t in TERMS}
        out.append(BatchCost(fwd, {t: np.zeros_like(fwd[t]) for t in TERMS},
                             min(c.per_micro_batch_rest_s for c in cs), 0.0, 0.0))
    return out


# ---------------------------------------------------------------- the report

def _mean(steps: list[StepPasses], field: str) -> float:
    return float(np.mean([getattr(s, field) for s in steps]))


def _row(steps: list[StepPasses]) -> dict:
    return {"update_s": _mean(steps, "update_s"), "logprob_s": _mean(steps, "logprob_s"), "ref_s": _mean(steps, "ref_s"),
            "migration_s": _mean(steps, "migration_s"), "runtime_s": _mean(steps, "runtime_s"),
            "step_time_s": _mean(steps, "total_s"), "initial_s": steps[0].initial_s}


def pass_imbalance(per_step: list[tuple[StrategyResult, StrategyResult]]) -> dict:
    """p50 / p95 of max / mean pairs per rank over every (step, micro-batch, layer) of the logprob and ref
    passes [(logprob, ref) results per step]."""
    out = {}
    for k, p in enumerate(FORWARD_PASSES):
        imb = np.concatenate([pair[k].imbalance().reshape(-1) for pair in per_step])
        out[p] = {"p50": float(np.percentile(imb, 50)), "p95": float(np.percentile(imb, 95))}
    return out


def whole_step_timing(update_results: dict, forward: ForwardRun | None, passes: tuple[str, ...], model: ModelPreset,
                      profile: HardwareProfile, topo, *, prefetch: bool = True, mean_context: float = 1024.0) -> dict:
    """The whole trainer step per strategy (JSON-ready):
      {"passes": [...], "forward_micro_batches_per_step": [...],
       "strategies": {name: {update_s, logprob_s, ref_s, migration_s, runtime_s, step_time_s, initial_s,
                             throughput_vs_megatron, throughput_vs_ideal,
                             imbalance: {logprob|ref: {p50, p95}} (pass_imbalance)}},
       "forward_unbalanced": {relibra strategy: the same, its forward passes unbalanced}}
    Means over the steps; with several steps the first step's migrations are initial_s (steady state)."""
    costs = strategy_costs(update_results, model, profile, topo, prefetch=prefetch, mean_context=mean_context)
    rows, unb = {}, {}
    for name, steps in update_results.items():
        if name == IDEAL:
            continue
        fwd = forward.results["balanced"][name] if forward is not None else None
        rows[name] = _row(strategy_passes(name, costs[name], steps, fwd, passes, model, profile, topo,
                                          prefetch=prefetch, mean_context=mean_context))
        if fwd is not None:
            rows[name]["imbalance"] = pass_imbalance(fwd)
        if forward is not None and name in forward.results["unbalanced"]:
            per = forward.results["unbalanced"][name]
            unb[name] = _row(strategy_passes(name, costs[name], steps, per, passes, model, profile, topo,
                                             prefetch=prefetch, mean_context=mean_context, forward_balanced=False))
            unb[name]["imbalance"] = pass_imbalance(per)
    if IDEAL in update_results:
        upd = ideal_costs(update_results, model, profile, topo, mean_context=mean_context)
        fw = ideal_forward_costs(forward, model, profile, topo, mean_context=mean_context) if forward is not None else None
        ideal = [StepPasses(u.total_s, logprob_s=fw[i].total_s if fw and "logprob" in passes else 0.0,
                            ref_s=fw[i].total_s if fw and "ref" in passes else 0.0) for i, u in enumerate(upd)]
        rows[IDEAL] = _row(ideal)
    for table in (rows, unb):
        for r in table.values():
            r["throughput_vs_megatron"] = rows[BASE]["step_time_s"] / r["step_time_s"] if BASE in rows else None
            r["throughput_vs_ideal"] = rows[IDEAL]["step_time_s"] / r["step_time_s"] if IDEAL in rows else None
    return {"passes": list(passes),
            "forward_micro_batches_per_step": [int(c.shape[0]) for c in forward.counts] if forward is not None else None,
            "strategies": rows, "forward_unbalanced": unb}


def format_whole_step(ws: dict, model: str, profile: str, forward_tokens_per_rank: int | None = None) -> str:
    """Text table of whole_step_timing's output; says which passes it covers."""
    passes = ws["passes"]
    split = ""
    if ws["forward_micro_batches_per_step"] is not None:
        split = (f"; logprob/ref split {forward_tokens_per_rank} tokens/rank, micro-batches "
                 f"{ws['forward_micro_batches_per_step']}")
    lines = [f"whole trainer step ({model} on {profile}), passes: {' + '.join(passes)}{split}; seconds per step",
             "  update = forward + backward; logprob (old log-probs, actor) and ref (reference model) forward only;"
             " migration once per step",
             f"{'strategy':<31}{'update':>9}{'logprob':>9}{'ref':>9}{'migr.':>8}{'runtime':>9}{'step s':>9}"
             f"{'vs megatron':>13}{'vs ideal':>10}"]

    def line(label, r):
        f = lambda x: f"{x:.3f}" if x is not None else "-"  # noqa: E731
        return (f"{label:<31}{r['update_s']:>9.3f}{r['logprob_s']:>9.3f}{r['ref_s']:>9.3f}{r['migration_s']:>8.4f}"
                f"{r['runtime_s']:>9.4f}{r['step_time_s']:>9.3f}{f(r['throughput_vs_megatron']):>13}"
                f"{f(r['throughput_vs_ideal']):>10}")
    for name, r in ws["strategies"].items():
        lines.append(line(name + (" (fwd balanced)" if name in ws["forward_unbalanced"] else ""), r))
    for name, r in ws["forward_unbalanced"].items():
        lines.append(line(name + " (fwd unbalanced)", r))
    return "\n".join(lines)
