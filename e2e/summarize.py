"""Turn the two end-to-end runs (metrics.jsonl from verl's file logger, the probe's JSON lines) into
summary.json and the list of failed checks. Pure file reading: `python e2e/summarize.py OUT` re-checks a
finished run."""
from __future__ import annotations

import glob
import json
import math
import os
import sys

LOSS_KEY = "actor/pg_loss"
GRAD_NORM_KEY = "actor/grad_norm"
MIN_GREEDY_SHARE = 0.5
FORWARD_PASSES = ("logprob", "ref")
# old and ref log-probs on/off on step 1 (same weights, same rollouts): bf16 forward-pass rounding (a
# replica's tokens in their own GEMM); a wrong expert would move a log-prob by about a nat on this model
LOG_PROB_ATOL = 0.05


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_probe(run_dir: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "probe", "*.jsonl"))):
        for rec in read_jsonl(path):
            out.setdefault(rec["kind"], []).append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: r["time"])
    return out


def step_metrics(run_dir: str) -> list[dict]:
    """verl's logged metrics per training step (the file logger writes one line per step)."""
    by_step = {}
    for rec in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        by_step.setdefault(int(rec["step"]), {}).update(rec["data"])
    return [by_step[s] for s in sorted(by_step)]


def _num(x):
    if isinstance(x, list):
        x = sum(x) / len(x) if x else float("nan")
    return float(x) if x is not None else float("nan")


def run_summary(run: dict) -> dict:
    steps = step_metrics(run["out"])
    probe = read_probe(run["out"])
    return {
        "returncode": run["returncode"],
        "losses": [_num(m.get(LOSS_KEY)) for m in steps],
        "grad_norms": [_num(m.get(GRAD_NORM_KEY)) for m in steps],
        # verl prefixes the actor's metrics with "actor/"
        "relibra": [{k[len("actor/"):]: _num(v) for k, v in m.items() if k.startswith("actor/relibra/")}
                    for m in steps],
        # the driver's (data placement) are not prefixed
        "driver": [{k: _num(v) for k, v in m.items() if k.startswith("relibra/")} for m in steps],
        "reward_mean": [_num(m.get("critic/score/mean")) for m in steps],
        "validation_reward": [_num(v) for m in steps for k, v in m.items() if k.startswith("val-core/")][:1],
        "_probe": probe,
    }


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def _by_step(probe: dict, validate: bool, steps: int) -> list[list[tuple]]:
    """Rollout samples grouped per training step (validation: the greedy rollout after that step), in the
    order the agent loop finished them; each group sorted, so only what was generated is compared."""
    recs = [r for r in probe.get("sample", []) if r["validate"] == validate]
    if not recs:
        return [[] for _ in range(steps)]
    per = len(recs) // steps
    return [sorted((tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in recs[i * per:(i + 1) * per])
            for i in range(steps)]


def compare_rollouts(on: dict, off: dict, steps: int) -> list[dict]:
    out = []
    for step, (s_on, s_off, g_on, g_off) in enumerate(zip(_by_step(on, False, steps), _by_step(off, False, steps),
                                                        _by_step(on, True, steps), _by_step(off, True, steps))):
        out.append({"step": step + 1,
                    "sampled": len(s_on), "sampled_same": sum(a == b for a, b in zip(s_on, s_off)),
                    "sampled_identical": bool(s_on) and s_on == s_off,
                    "greedy": len(g_on), "greedy_same": sum(a == b for a, b in zip(g_on, g_off)),
                    "greedy_identical": bool(g_on) and g_on == g_off})
    return out


def compare_log_probs(on: dict, off: dict, pass_name: str) -> dict:
    """Step 1's response log-probs of one forward-only pass (the first call on each rank), on vs off, as
    sorted lists over all ranks: verl's batch order is the order in which the asynchronous rollouts came
    back, so the same sequences can reach other ranks or positions in the two runs. Sorted lists differ
    by at most what the token-by-token differences do; a token computed by a wrong expert moves by far more."""
    def first(probe):
        return sorted(v for r in probe.get("log_probs", [])
                      if r.get("pass_name") == pass_name and r.get("call") == 1 for v in r["values"])

    a, b = first(on), first(off)
    errors = [r["error"] for probe in (on, off) for r in probe.get("log_probs", []) if "error" in r]
    if errors or not a or len(a) != len(b):
        return {"ok": False, "tokens_on": len(a), "tokens_off": len(b), "errors": errors[:2]}
    diffs = [abs(x - y) for x, y in zip(a, b)]
    worst = max(diffs)
    return {"ok": worst <= LOG_PROB_ATOL, "tokens": len(diffs), "max_abs_diff": worst,
            "identical_share": sum(d == 0 for d in diffs) / len(diffs), "atol": LOG_PROB_ATOL}


def canonical_order(on: dict, off: dict) -> dict:
    """Last weight export of each run: every routed expert's tensors must be closest, among that layer's
    experts in the relibra-off export, to the expert of the same id (canonical order), and the non-expert
    tensors equal within bf16 training noise."""
    exp_on, exp_off = on.get("export", []), off.get("export", [])
    if not exp_on or not exp_off:
        return {"ok": False, "reason": "no export recorded"}
    a, b = exp_on[-1]["fingerprints"], exp_off[-1]["fingerprints"]
    if set(a) != set(b):
        return {"ok": False, "reason": "different tensor names", "only_on": sorted(set(a) - set(b))[:5]}
    experts = [n for n in a if ".mlp.experts." in n]
    wrong = []
    for name in experts:
        head, tail = name.split(".mlp.experts.")
        eid, rest = tail.split(".", 1)
        peers = [n for n in experts if n.startswith(head + ".mlp.experts.") and n.endswith("." + rest)]
        best = min(peers, key=lambda n: sum(abs(x - y) for x, y in zip(a[name], b[n])))
        if best != name:
            wrong.append((name, best))
    rel = max((abs(x - y) / max(abs(y), 1e-6) for n in a for x, y in zip(a[n], b[n])), default=0.0)
    return {"ok": not wrong, "exports": [len(exp_on), len(exp_off)], "expert_tensors": len(experts),
            "matched_by_own_name": len(experts) - len(wrong), "mismatched": wrong[:5],
            "max_rel_fingerprint_diff": rel}


def summarize(out_root: str, runs: dict, steps: int, tol: dict, wall: dict) -> tuple[dict, list[str]]:
    failures: list[str] = []
    per_run = {name: run_summary(run) for name, run in runs.items()}
    for name, s in per_run.items():
        if s["returncode"] != 0:
            failures.append(f"{name}: main_ppo exited {s['returncode']} (see {runs[name]['out']}/log.txt)")
        if len(s["losses"]) != steps:
            failures.append(f"{name}: {len(s['losses'])} training steps logged, expected {steps}")
        if not all(math.isfinite(x) for x in s["losses"] + s["grad_norms"]):
            failures.append(f"{name}: a loss or grad norm is missing or not finite: {s['losses']} {s['grad_norms']}")
    checks: dict = {}
    on, off = per_run.get("relibra_on"), per_run.get("relibra_off")

    if on is not None:
        rel = on["relibra"]
        checks["relibra_metrics_every_step"] = len(rel) == steps and all(rel)
        if not checks["relibra_metrics_every_step"]:
            failures.append(f"relibra_on: relibra/* metrics missing on some step: {rel}")
        for i, m in enumerate(rel):
            if not m:
                continue
            if not m.get("relibra/replicas", 0) > 0:
                failures.append(f"relibra_on step {i + 1}: relibra/replicas = {m.get('relibra/replicas')}, expected > 0")
            if m.get("relibra/fallbacks", 1) != 0:
                failures.append(f"relibra_on step {i + 1}: relibra/fallbacks = {m.get('relibra/fallbacks')}, expected 0")
            before, after = m.get("relibra/imbalance_before", math.nan), m.get("relibra/imbalance_after", math.nan)
            if not after < before:
                failures.append(f"relibra_on step {i + 1}: imbalance after {after} not below before {before}")
        # the batch's placement is applied before its old-log-prob pass (relibra/logprob/moved_experts);
        # relibra/moved_experts counts moves after an optimizer step (none when the log-prob pass placed)
        moved = [m.get("relibra/logprob/moved_experts", 0) + m.get("relibra/moved_experts", 0) for m in rel]
        checks["reordered"] = len(moved) == steps and sum(moved) > 0
        if not checks["reordered"]:
            failures.append(f"relibra_on: experts moved per step {moved}: no reordering")
        for p in FORWARD_PASSES:
            per_step = [{k: m.get(f"relibra/{p}/{k}") for k in ("imbalance_before", "imbalance_after",
                                                                  "replica_tokens", "fallbacks", "moved_experts")}
                        for m in rel]
            checks[f"{p}_balanced"] = per_step
            if not per_step or any(v["imbalance_after"] is None or v["fallbacks"] != 0 for v in per_step):
                failures.append(f"relibra_on: relibra/{p}/* metrics missing or fallbacks on some step: {per_step}")
            elif not per_step[0]["imbalance_after"] < per_step[0]["imbalance_before"]:
                failures.append(f"relibra_on step 1: {p} imbalance after {per_step[0]['imbalance_after']} not below "
                                f"before {per_step[0]['imbalance_before']}")
        # the driver read every step's routes from TransferQueue and ran the co-placement planner (verl's V1
        # trainer); on one node it keeps verl's placement, so only that it ran is checked here
        planned = [m.get("relibra/data_placement_ms") for m in on["driver"]]
        checks["data_placement_planned_every_step"] = planned
        if len(planned) != steps or any(p is None or not math.isfinite(p) for p in planned):
            failures.append(f"relibra_on: the driver's data placement did not plan every step "
                            f"(relibra/data_placement_ms {planned}; see the log for its reason)")
        routes = on["_probe"].get("routes", [])
        checks["routes_from_vllm"] = bool(routes) and all(r["shape"] is not None for r in routes)
        if not checks["routes_from_vllm"]:
            failures.append(f"no routed_experts arrived from vLLM: {routes}")
        rows_ok = [r for r in on["_probe"].get("sample", []) if r["route_rows"] is not None
                   and r["route_rows"] == len(r["prompt_ids"]) + len(r["response_ids"]) - 1]
        checks["route_rows_are_tokens_minus_one"] = len(rows_ok) == len(on["_probe"].get("sample", []))
        mism = on["_probe"].get("replay_mismatch", [])
        rows = sum(r.get("rows", 0) for r in mism)
        wrong = sum(r.get("mismatch_rows", 0) for r in mism)
        checks["replay_mismatch_measured"] = rows > 0 and not any("error" in r for r in mism)
        if not checks["replay_mismatch_measured"]:
            failures.append(f"replay mismatch not measured: {mism}")

    if on is not None and off is not None:
        checks["relibra_off_has_no_relibra_metrics"] = not any(off["relibra"])
        if not checks["relibra_off_has_no_relibra_metrics"]:
            failures.append(f"relibra_off logged relibra metrics: {off['relibra']}")
        rollouts = compare_rollouts(on["_probe"], off["_probe"], steps)
        # Step 1 starts from the same weights, so its sampled rollouts must be token-identical. After an
        # update the weights differ by bf16 rounding (relibra sums the same terms in another order, and Adam
        # turns the sign of a near-zero gradient into a full lr step), and on this random model, whose output
        # distribution is nearly flat, that can flip a greedy token or a sample; the runs then drift apart.
        # Most greedy responses must stay identical: a wrong expert order changes nearly all of them
        # (measured with --fault swap_experts, docs/e2e.md).
        first = rollouts[0] if rollouts else None
        checks["step1_sampled_rollouts_identical"] = bool(first) and first["sampled_identical"]
        if not checks["step1_sampled_rollouts_identical"]:
            failures.append(f"step 1 sampled rollouts differ on/off (same initial weights): {first}")
        g_same = sum(r["greedy_same"] for r in rollouts)
        g_total = sum(r["greedy"] for r in rollouts)
        s_same = sum(r["sampled_same"] for r in rollouts)
        s_total = sum(r["sampled"] for r in rollouts)
        checks["greedy_identical_share"] = g_same / g_total if g_total else 0.0
        checks["sampled_identical_share"] = s_same / s_total if s_total else 0.0
        if not checks["greedy_identical_share"] >= MIN_GREEDY_SHARE:
            failures.append(f"only {g_same} of {g_total} greedy validation responses identical on/off "
                            f"(< {MIN_GREEDY_SHARE})")
        # losses and grad norms are compared on the steps that trained on the same tokens from the start
        # (the leading steps whose sampled rollouts were identical): there the runs differ only by rounding
        n = min(len(on["losses"]), len(off["losses"]), len(rollouts))
        comparable = []
        for i in range(n):
            if not rollouts[i]["sampled_identical"]:
                break
            comparable.append(i)
        checks["steps_on_identical_data"] = [i + 1 for i in comparable]
        for key in ("losses", "grad_norms"):
            bad = [(i + 1, on[key][i], off[key][i]) for i in comparable if not _close(on[key][i], off[key][i], **tol)]
            checks[f"{key}_equal"] = bool(comparable) and not bad
            if not checks[f"{key}_equal"]:
                failures.append(f"{key}: no step with identical rollouts to compare" if not comparable else
                                f"{key} differ beyond {tol} on identical data (step, on, off): {bad}")
        checks["max_rel_diff_on_identical_data"] = {
            key: max((abs(on[key][i] - off[key][i]) / max(abs(off[key][i]), 1e-12) for i in comparable),
                     default=None) for key in ("losses", "grad_norms")}
        checks["max_rel_diff_all_steps"] = {key: max((abs(on[key][i] - off[key][i]) / max(abs(off[key][i]), 1e-12)
                                                      for i in range(n)), default=None)
                                            for key in ("losses", "grad_norms")}
        for p in FORWARD_PASSES:
            lp = compare_log_probs(on["_probe"], off["_probe"], p)
            checks[f"{p}_log_probs_step1"] = lp
            if not lp["ok"]:
                failures.append(f"step 1 {p} log-probs differ on/off (same weights and rollouts): {lp}")
        order = canonical_order(on["_probe"], off["_probe"])
        checks["exported_experts_in_canonical_order"] = order["ok"]
        if not order["ok"]:
            failures.append(f"exported expert weights do not match by name on/off: {order}")
        checks["rollouts"] = rollouts
        checks["export"] = order

    summary = {
        "steps": steps,
        "tolerance": tol,
        "checks": checks,
        "wall_s": {k: round(v, 1) for k, v in wall.items()},
    }
    for name, s in per_run.items():
        summary[name] = {k: v for k, v in s.items() if not k.startswith("_")}
    if on is not None:
        routes = on["_probe"].get("routes", [])
        summary["routes"] = {"as_received_from_vllm": routes[:2],
                             "dtype": sorted({r["dtype"] for r in routes if r["dtype"]}),
                             "rows_are_tokens_minus_one": checks.get("route_rows_are_tokens_minus_one")}
        mism = on["_probe"].get("replay_mismatch", [])
        rows = sum(r.get("rows", 0) for r in mism)
        wrong = sum(r.get("mismatch_rows", 0) for r in mism)
        summary["replay_mismatch"] = {"fraction": wrong / rows if rows else None, "rows": rows,
                                      "mismatch_rows": wrong, "per_rank": mism}
    return summary, failures


if __name__ == "__main__":
    root = sys.argv[1]
    found = {n: {"returncode": 0, "wall_s": 0.0, "out": os.path.join(root, n)}
             for n in ("relibra_on", "relibra_off") if os.path.isdir(os.path.join(root, n))}
    s, fails = summarize(root, found, int(sys.argv[2]) if len(sys.argv) > 2 else 3,
                         {"rtol": 2e-3, "atol": 1e-5}, {})
    print(json.dumps({k: v for k, v in s.items() if k not in ("relibra_on", "relibra_off")}, indent=1))
    print("\n".join(fails) or "all checks passed")
