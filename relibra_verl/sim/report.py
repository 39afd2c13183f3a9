"""Step time and throughput per strategy from planner results; table and PNG plot.

Entry point for the `simulate` command: `simulate_timing(results_by_strategy, model, profile, topo)`, where
results_by_strategy maps a strategy name to one planner StrategyResult per step (batch). Every strategy sees
the same batches, so throughput ratios are ratios of mean step times.
"""
from __future__ import annotations

import numpy as np

from relibra_verl.errors import UsageError
from relibra_verl.sim.cost import TERMS, BatchCost, batch_cost, result_cost
from relibra_verl.sim.overheads import runtime_seconds
from relibra_verl.sim.planning import min_replica_tokens
from relibra_verl.sim.presets import ModelPreset, get_preset
from relibra_verl.sim.profiles import HardwareProfile, load_profile

BASE = "megatron"
IDEAL = "ideal"


def mean_context(seq_lens) -> float:
    """Mean attended positions per token of causal attention over sequences [S]: sum(len^2) / (2 sum(len))."""
    lens = np.asarray(seq_lens, dtype=np.float64)
    return float((lens ** 2).sum() / (2.0 * lens.sum())) if lens.sum() > 0 else 0.0


def check_shapes(results_by_strategy: dict, model: ModelPreset, topo) -> None:
    """UsageError when the traces' shape does not match the preset (experts, MoE layers)."""
    if topo.E != model.num_experts:
        raise UsageError(f"the trace has {topo.E} experts per layer but preset {model.name} has {model.num_experts}")
    for name, steps in results_by_strategy.items():
        for r in steps:
            L = np.shape(r.rank_tokens)[1]
            if L != model.num_moe_layers:
                raise UsageError(f"the trace has {L} MoE layers but preset {model.name} has {model.num_moe_layers}")
            return


def ideal_costs(results_by_strategy: dict, model: ModelPreset, profile: HardwareProfile, topo, *,
                mean_context: float = 1024.0) -> list[BatchCost]:
    """The ideal's cost per step, a lower bound by construction: for each (micro-batch, layer) and term,
    the least balanced cost (cost.batch_cost(balanced=True)) over every strategy's result for that step.
    Per (micro-batch, layer), with a, b the GEMM coefficients (cost.expert_gemm_coeffs):
      dispatch  max over ranks and links of max(the rank's sends, the mean receive) of that strategy
      expert    (sum over ranks of its GEMM calls * a + all pairs * b) / G, the mean rank of that strategy
                (a strategy without `calls`: S + replicas + redundant per rank)
      non_moe, dense layers and head: the data's (the same for every strategy)
      replica copies, migration, runtime: none.
    Each term is at most the same term of the strategy it balances (a mean is at most the max), and every
    strategy sees the same batches, so no strategy's step time is below the ideal's."""
    nodes = np.asarray(topo.node_of_rank)
    per = [[batch_cost(r.rank_tokens, r.traffic, r.replicas, r.moved_experts, nodes, model, profile,
                       mean_context=mean_context, balanced=True, calls=getattr(r, "calls", None),
                       redundant=getattr(r, "redundant", None)) for r in steps]
           for steps in results_by_strategy.values()
           # the bound of the strategies on verl's data placement: relibra-locality's data is its own
           if not any(getattr(getattr(r, "data", None), "fell_back", True) is False for r in steps)]
    out = []
    for i in range(min(len(p) for p in per)):
        cs = [p[i] for p in per]
        fwd = {t: np.minimum.reduce([c.fwd[t] for c in cs]) for t in TERMS}
        bwd = {t: np.minimum.reduce([c.bwd[t] for c in cs]) for t in TERMS}
        out.append(BatchCost(fwd, bwd, min(c.per_micro_batch_rest_s for c in cs), 0.0, 0.0, 0.0))
    return out


def replica_sends(plan) -> np.ndarray:
    """[M, L, G] replica copies each rank sends (as the home of the replicated expert) in a relibra plan."""
    rep = np.asarray(plan.replica_expert)                                  # [M, L, G, R]
    M, L, G, _ = rep.shape
    home_rank = plan.home_of_expert() // plan.topo.S                       # [L, E]
    out = np.zeros((M, L, G), dtype=np.int64)
    m_i, l_i, _, k_i = np.nonzero(rep >= 0)
    src = home_rank[l_i, rep[rep >= 0]]
    np.add.at(out, (m_i, l_i, src), 1)
    return out


def step_cost(name: str, result, prev_placement, model: ModelPreset, profile: HardwareProfile, topo, *,
              prefetch: bool = True, mean_context: float = 1024.0) -> BatchCost:
    """BatchCost of one step of strategy `name`: cost.result_cost plus the runtime's own costs (overheads).
    prev_placement: the strategy's placement of the previous step (None: Megatron's layout). A relibra
    plan's copies are charged at the busier of their receivers and senders (replica_sends)."""
    if getattr(result, "plan", None) is not None and getattr(result, "replica_sends", None) is None:
        result.replica_sends = replica_sends(result.plan)
    cost = result_cost(result, np.asarray(topo.node_of_rank), model, profile, prefetch=prefetch,
                       mean_context=mean_context, prev_placement=prev_placement)
    cost.runtime_s = float(sum(runtime_seconds(name, result, prev_placement, topo, profile).values()))
    return cost


def strategy_costs(results_by_strategy: dict, model: ModelPreset, profile: HardwareProfile, topo, *,
                   prefetch: bool = True, mean_context: float = 1024.0) -> dict[str, list[BatchCost]]:
    """BatchCost of every step of every strategy, with the runtime's own per-step costs
    (relibra_verl.sim.overheads). With several steps, step 0's migration (away from Megatron's layout, once
    per run) is moved to its `initial_migration_s`: the mean is the steady state."""
    costs = {name: [step_cost(name, r, getattr(steps[i - 1], "placement", None) if i else None, model, profile, topo,
                              prefetch=prefetch, mean_context=mean_context)
                    for i, r in enumerate(steps)]
             for name, steps in results_by_strategy.items()}
    for cs in costs.values():
        if len(cs) > 1:  # steady state: the move away from Megatron's layout before step 0 happens once per run
            cs[0].initial_migration_s, cs[0].migration_s = cs[0].migration_s, 0.0
    return costs


def simulate_timing(results_by_strategy: dict, model: ModelPreset | str, profile: HardwareProfile | str, topo, *,
                    mean_context: float = 1024.0, prefetch: bool = True) -> dict:
    """Step time and throughput per strategy.

    results_by_strategy: {strategy: [StrategyResult per step]} with rank_tokens [M, L, G], traffic
    [M, L, G, G], replicas [M, L, G], redundant [L, G], moved_experts [L], plan_ms. topo: the planner
    Topology (node_of_rank, E). Returns a JSON-ready dict:
      {"model", "profile", "prefetch", "mean_context", "planning": {min_replica_tokens, ...},
       "strategies": {name: {"step_time_s", "throughput_vs_megatron", "throughput_vs_ideal",
                             "breakdown_s": {term: seconds per step}, "plan_ms", "initial_migration_s"}},
       "prefetch_effect": {name: {"prefetch_s", "online_s"}} for strategies with per-micro-batch replicas}
    The ideal's time is ideal_costs(): every rank receives the mean pairs (each source still sends what the
    data split gives it) and computes the mean GEMM work, the least over the strategies, no overhead: a
    lower bound of every strategy's time by construction.
    Ratios are None when megatron or ideal was not simulated. With several steps the first step's migration
    (away from Megatron's layout, once per run) is left out of the mean and reported as initial_migration_s.
    """
    model = get_preset(model) if isinstance(model, str) else model
    profile = load_profile(profile)
    check_shapes(results_by_strategy, model, topo)
    costs = strategy_costs(results_by_strategy, model, profile, topo, prefetch=prefetch, mean_context=mean_context)
    shape = {"num_nodes": topo.num_nodes, "gpus_per_node": topo.ranks_per_node}
    if IDEAL in costs:
        costs[IDEAL] = ideal_costs(results_by_strategy, model, profile, topo, mean_context=mean_context)
    initial = {name: cs[0].migration_s if cs[0].initial_migration_s is None else cs[0].initial_migration_s for name, cs in costs.items()}
    step = {name: float(np.mean([c.total_s for c in cs])) for name, cs in costs.items()}
    out = {"model": model.name, "profile": profile.name, "prefetch": prefetch, "mean_context": mean_context,
           "planning": {"min_replica_tokens": min_replica_tokens(model, profile, prefetch=prefetch, **shape),
                        "min_replica_tokens_online": min_replica_tokens(model, profile, prefetch=False, **shape)},
           "strategies": {}, "prefetch_effect": {}}
    for name, cs in costs.items():
        t = step[name]
        bd = {k: float(np.mean([c.breakdown()[k] for c in cs])) for k in cs[0].breakdown()}
        out["strategies"][name] = {
            "step_time_s": t,
            "throughput_vs_megatron": step[BASE] / t if BASE in step else None,
            "throughput_vs_ideal": step[IDEAL] / t if IDEAL in step else None,
            "breakdown_s": bd,
            "plan_ms": float(np.mean([c.plan_ms for c in cs])),
            "initial_migration_s": initial[name],
        }
    for name, steps in results_by_strategy.items():
        if any(np.asarray(r.replicas).any() for r in steps):
            online = strategy_costs({name: steps}, model, profile, topo, prefetch=not prefetch, mean_context=mean_context)[name]
            other = float(np.mean([c.total_s for c in online]))
            out["prefetch_effect"][name] = {"prefetch_s": step[name] if prefetch else other,
                                            "online_s": other if prefetch else step[name]}
    return out


def format_timing(timing: dict) -> str:
    """Text table of simulate_timing's output."""
    lines = [f"step time ({timing['model']} on {timing['profile']}, replica copies "
             f"{'sent ahead' if timing['prefetch'] else 'on the critical path'}; seconds per step)",
             f"{'strategy':<19}{'step s':>9}{'vs megatron':>13}{'vs ideal':>10}   "
             + "".join(f"{t:>10}" for t in TERMS) + f"{'migration':>11}{'runtime':>9}"]
    for name, s in timing["strategies"].items():
        f = lambda x: f"{x:.3f}" if x is not None else "-"  # noqa: E731
        bd = s["breakdown_s"]
        lines.append(f"{name:<19}{s['step_time_s']:>9.3f}{f(s['throughput_vs_megatron']):>13}{f(s['throughput_vs_ideal']):>10}   "
                     + "".join(f"{bd[t] + (bd['redundant_sync'] if t == 'replica' else 0):>10.3f}" for t in TERMS)
                     + f"{bd['migration']:>11.4f}{bd['runtime']:>9.4f}")
    p = timing["planning"]
    lines.append(f"a replica repays its copies and its GEMM call from {p['min_replica_tokens']} routed pairs "
                 f"(sent ahead; {p['min_replica_tokens_online']} on the critical path)")
    for name, e in timing["prefetch_effect"].items():
        lines.append(f"{name}: {e['prefetch_s']:.3f} s/step with copies sent ahead, {e['online_s']:.3f} s on the critical path")
    return "\n".join(lines)


def plot_report(results_by_strategy: dict, timing: dict, path: str, title: str = "") -> None:
    """PNG: top, imbalance (max/mean pairs per rank, mean over MoE layers) of every micro-batch over the run
    per strategy; bottom, throughput vs megatron (bars) with the ratio to ideal written on each bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results_by_strategy)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    for name in names:
        imb = []
        for r in results_by_strategy[name]:
            rt = np.asarray(r.rank_tokens, dtype=np.float64)
            mean = rt.mean(-1)
            imb.append(np.where(mean > 0, rt.max(-1) / np.where(mean > 0, mean, 1), 1.0).mean(axis=1))  # [M]
        y = np.concatenate(imb)
        ax1.plot(np.arange(1, len(y) + 1), y, marker="." if len(y) < 80 else None, lw=1.2, label=name)
    bounds = np.cumsum([np.shape(r.rank_tokens)[0] for r in results_by_strategy[names[0]]])[:-1]
    for x in bounds:
        ax1.axvline(x + 0.5, color="grey", lw=0.6, ls=":")
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.set_xlabel("micro-batch over the run (dotted lines: step boundaries)")
    ax1.set_ylabel("imbalance (max / mean per rank)\nmean over MoE layers")
    ax1.axhline(1.0, color="k", lw=0.5)
    ax1.legend(ncol=4, fontsize=8)
    ax1.set_title(title or f"{timing['model']} on {timing['profile']}")
    st = timing["strategies"]
    vals = [st[n]["throughput_vs_megatron"] or 0.0 for n in names]
    bars = ax2.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
    for b, n in zip(bars, names):
        vi = st[n]["throughput_vs_ideal"]
        if vi is not None:
            ax2.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{vi:.0%} of ideal", ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("throughput vs megatron")
    ax2.axhline(1.0, color="k", lw=0.5)
    ax2.set_ylim(0, max(vals + [1.0]) * 1.15)
    ax2.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
