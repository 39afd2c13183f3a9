"""The whole trainer step (relibra_verl.sim.passes): forward-only passes by hand on a tiny case, the EPLB
copies of a frozen model, the update-only step equal to simulate_timing, and `simulate --passes` end to end."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from relibra_verl.cli import main
from relibra_verl.planner import strategies
from relibra_verl.planner.replicate import ReplicationConfig
from relibra_verl.planner.strategies import run_strategy
from relibra_verl.planner.types import Topology
from relibra_verl.sim.cost import TERMS, batch_cost
from relibra_verl.sim.passes import (changed_redundant, forward_cost, forward_replication, parse_passes, redundant_sync,
                                     whole_step_timing)
from relibra_verl.sim.presets import get_preset
from relibra_verl.sim.profiles import load_profile
from relibra_verl.sim.report import simulate_timing

from _tiny import NODES, NS, ROUND, TINY, TRAFFIC


def tiny_result(replicas=(0, 1, 0, 0)):
    return types.SimpleNamespace(rank_tokens=TRAFFIC.sum(axis=2), traffic=TRAFFIC,
                                 replicas=np.array(replicas)[None, None], redundant=None, calls=None)


@pytest.mark.parametrize("prefetch, replica_ns", [(False, 96.0), (True, 9.6)])
def test_forward_cost_by_hand(prefetch, replica_ns):
    """One micro-batch, one MoE layer, 4 ranks on 2 nodes, forward only:
    dispatch + combine: busiest IB rank 4 pairs * 8 * 2 B at 0.5 GB/s = 128 ns, twice             256 ns
    expert: rank 3, 1 call * 192 ns + 12 pairs * 192 ns (rank 1's replica call: 2 * 192 + 7 * 192) 2496 ns
    non-MoE: busiest source rank 15 pairs / K 2 = 7.5 tokens * (2 * 132 + 2 * 1 * 8 * 10) FLOPs   3180 ns
    dense layer + head: 7.5 tokens * (2 * 484 + 160 + 2 * 8 * 10) FLOPs, forward only             9660 ns
    replica: 1 copy * 96 params * 2 B at 2 GB/s = 96 ns, weights once (no backward re-copy, no gradient);
    sent ahead it hides behind the 3180 ns window but for the contention share 0.1: 9.6 ns."""
    c = forward_cost(tiny_result(), NODES, TINY, ROUND, prefetch=prefetch, mean_context=10.0)
    assert c.fwd["dispatch"][0, 0] == pytest.approx(256 * NS)
    assert c.fwd["expert"][0, 0] == pytest.approx(2496 * NS)
    assert c.fwd["non_moe"][0, 0] == pytest.approx(3180 * NS)
    assert c.fwd["replica"][0, 0] == pytest.approx(replica_ns * NS)
    assert c.per_micro_batch_rest_s == pytest.approx(9660 * NS)
    assert all(not c.bwd[t].any() for t in TERMS)
    assert c.total_s == pytest.approx((256 + 2496 + 3180 + 9660 + replica_ns) * NS)
    # the update over the same plan costs the forward, its backward (x2 compute, re-copy + gradient) on top
    upd = batch_cost(TRAFFIC.sum(axis=2), TRAFFIC, np.array([0, 1, 0, 0])[None, None], np.zeros(1), NODES, TINY, ROUND,
                     prefetch=prefetch, mean_context=10.0)
    assert upd.total_s > 2.9 * c.total_s


def test_forward_cost_balanced_is_lower_and_ignores_replicas():
    real = forward_cost(tiny_result(), NODES, TINY, ROUND, prefetch=False, mean_context=10.0)
    ideal = forward_cost(tiny_result(), NODES, TINY, ROUND, prefetch=False, mean_context=10.0, balanced=True)
    # expert: (the 4 home calls * 192 + 41 pairs * 192) / 4 ranks = 2160 ns (no replica, so no replica call)
    assert ideal.fwd["expert"][0, 0] == pytest.approx(2160 * NS)
    assert ideal.fwd["replica"][0, 0] == 0.0
    assert ideal.total_s < real.total_s


def test_redundant_sync_weights_and_gradients_by_hand():
    """copy_s = 5 us per byte per parameter: weights 10 us stream beside micro-batch 0's forward before the
    layer's experts (its 3180 ns non-MoE): 6820 ns exposed + 0.1 x 3180 ns contention; gradients 20 us after
    the last backward with nothing below to hide behind: all exposed."""
    c = forward_cost(tiny_result(), NODES, TINY, ROUND, prefetch=False, mean_context=10.0)
    copy_s = np.array([5e-6])
    assert redundant_sync(copy_s, c, ROUND, weights=True, grads=False) == pytest.approx((6820 + 318) * NS)
    assert redundant_sync(copy_s, c, ROUND, weights=False, grads=True) == pytest.approx(20000 * NS)
    assert redundant_sync(copy_s, c, ROUND, weights=True, grads=True) == pytest.approx((6820 + 318 + 20000) * NS)
    assert redundant_sync(np.zeros(1), c, ROUND, weights=True, grads=True) == 0.0


def test_changed_redundant_keeps_only_new_copies():
    prev = np.array([[0, 1, -2, 2, 3, -4]])   # redundant copies of experts 0 and 2
    new = np.array([[0, 1, -2, 2, 3, -5]])    # expert 3's copy replaces expert 2's
    assert changed_redundant(new, prev).tolist() == [[0, 1, -1, 2, 3, -5]]
    assert changed_redundant(new, None).tolist() == new.tolist()


def test_forward_replication_by_hand():
    """a = b = 192 ns; a weight copy 96 ns, sent ahead 9.6 ns exposed; a pair's 2 forward all-to-alls
    carry 32 B: IB 64 ns (half the pairs cross), NVLink 32 ns (a quarter): pair = 192 + 32 = 224 ns."""
    cfg = forward_replication(ReplicationConfig(replica_overhead_pairs=1.0, max_copies_per_owner=3), TINY, ROUND, 2, 2)
    assert cfg.min_replica_tokens == 1                       # ceil(9.6 / 224)
    assert cfg.copy_cost_pairs == pytest.approx(0.05)        # 9.6 / 192
    assert cfg.inter_node_share == pytest.approx(0.25)       # 64 / (192 + 64)
    assert (cfg.replica_overhead_pairs, cfg.max_copies_per_owner) == (1.0, 3)
    online = forward_replication(ReplicationConfig(), TINY, ROUND, 2, 2, prefetch=False)
    assert online.copy_cost_pairs == pytest.approx(0.5)


@pytest.mark.parametrize("text, ok", [("update", ("update",)), ("ref, update,logprob", ("update", "logprob", "ref")),
                                      ("logprob", None), ("update,critic", None), ("", None)])
def test_parse_passes(text, ok):
    if ok is None:
        with pytest.raises(Exception) as exc:
            parse_passes(text)
        assert "pass" in str(exc.value)
    else:
        assert parse_passes(text) == ok


def test_update_only_whole_step_equals_simulate_timing():
    """With the update alone the whole step is simulate_timing's step time, strategy by strategy."""
    model, profile = get_preset("deepseek-v2-lite"), load_profile("h100-ib400")
    topo = Topology(64, 8, 4, 2)
    rng = np.random.default_rng(3)
    steps = [rng.poisson(rng.gamma(0.5, 40.0, size=(2, 26, 8, 64))).astype(np.int64) for _ in range(2)]
    results = {}
    for name in ("megatron", "eplb-oracle", "relibra", "ideal"):
        prev, per = None, []
        for c in steps:
            r = run_strategy(name, c, topo, prev_placement=prev)
            prev = r.placement
            per.append(r)
        results[name] = per
    timing = simulate_timing(results, model, profile, topo, mean_context=300.0)
    ws = whole_step_timing(results, None, ("update",), model, profile, topo, mean_context=300.0)
    for name, s in timing["strategies"].items():
        assert ws["strategies"][name]["step_time_s"] == pytest.approx(s["step_time_s"], rel=1e-12)
        assert ws["strategies"][name]["throughput_vs_ideal"] == pytest.approx(s["throughput_vs_ideal"], rel=1e-12)
    assert ws["forward_unbalanced"] == {} or all(ws["forward_unbalanced"][n]["logprob_s"] == 0 for n in ws["forward_unbalanced"])


BOTH = ["--trace", "bundled:esft_intent", "--trace", "bundled:esft_law"]
SMALL = ["--ep", "8", "--gpus-per-node", "4", "--replica-slots", "2", "--tokens-per-rank", "1024", "--no-progress",
         "--resample", "80", "--steps", "2", "--model", "deepseek-v2-lite"]


@pytest.fixture
def no_plan_clock(monkeypatch):
    """Planner wall time reads 0, so two runs print the same plan ms."""
    monkeypatch.setattr(strategies, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))


def test_passes_update_is_the_default_output(tmp_path, capsys, no_plan_clock):
    names = ["--strategies", "megatron,eplb-oracle,relibra,ideal"]
    assert main(["simulate", *BOTH, *SMALL, *names, "--json", str(tmp_path / "a.json")]) == 0
    default = capsys.readouterr().out
    assert main(["simulate", *BOTH, *SMALL, *names, "--passes", "update", "--json", str(tmp_path / "b.json")]) == 0
    assert capsys.readouterr().out == default
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert "whole trainer step" not in default and "whole_step" not in (tmp_path / "a.json").read_text()


def test_passes_whole_step_report(tmp_path, capsys):
    """Skewed real routing: relibra with its forward passes balanced is faster over the whole step than
    with them unbalanced; the ideal bounds every row; megatron's logprob and ref passes cost the same;
    the update pass of a strategy without redundant copies is its update-only step less migration and runtime;
    a forward split of 2048 tokens per rank has fewer micro-batches than the update's 1024."""
    js = tmp_path / "r.json"
    assert main(["simulate", *BOTH, *SMALL, "--strategies", "megatron,eplb-periodic,eplb-oracle,relibra,ideal",
                 "--passes", "update,logprob,ref", "--logprob-tokens-per-rank", "2048", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "passes: update + logprob + ref; logprob/ref split 2048 tokens/rank" in out
    assert "relibra (fwd unbalanced)" in out and "relibra (fwd balanced)" in out
    r = json.loads(js.read_text())
    ws, upd = r["timing"]["whole_step"], r["timing"]["strategies"]
    rows, unb = ws["strategies"], ws["forward_unbalanced"]
    assert ws["passes"] == ["update", "logprob", "ref"]
    assert all(f < u for f, u in zip(ws["forward_micro_batches_per_step"], r["config"]["micro_batches_per_step"]))
    assert rows["relibra"]["step_time_s"] < unb["relibra"]["step_time_s"]
    assert rows["relibra"]["logprob_s"] < unb["relibra"]["logprob_s"] and rows["relibra"]["ref_s"] < unb["relibra"]["ref_s"]
    assert rows["relibra"]["update_s"] == unb["relibra"]["update_s"]
    for p in ("logprob", "ref"):   # per-pass imbalance: relibra's forward passes balanced, megatron's not
        assert rows["relibra"]["imbalance"][p]["p95"] < unb["relibra"]["imbalance"][p]["p95"]
        assert unb["relibra"]["imbalance"]["ref"] == rows["megatron"]["imbalance"]["ref"]
    for row in list(rows.values()) + list(unb.values()):
        assert rows["ideal"]["step_time_s"] <= row["step_time_s"] * (1 + 1e-12)
        assert rows["ideal"]["logprob_s"] <= row["logprob_s"] * (1 + 1e-12)
        assert row["step_time_s"] == pytest.approx(sum(row[k] for k in ("update_s", "logprob_s", "ref_s", "migration_s",
                                                                       "runtime_s")))
    m = rows["megatron"]
    assert m["logprob_s"] == m["ref_s"] > 0 and m["throughput_vs_megatron"] == pytest.approx(1.0)
    assert m["update_s"] == pytest.approx(upd["megatron"]["step_time_s"])
    bd = upd["relibra"]["breakdown_s"]
    assert rows["relibra"]["update_s"] == pytest.approx(upd["relibra"]["step_time_s"] - bd["migration"] - bd["runtime"])
    # EPLB: the logprob pass fetches the redundant copies' weights, the update only reduces their gradients
    e_bd = upd["eplb-periodic"]["breakdown_s"]
    assert rows["eplb-periodic"]["update_s"] < upd["eplb-periodic"]["step_time_s"] - e_bd["migration"] - e_bd["runtime"]
    assert rows["eplb-periodic"]["logprob_s"] > rows["eplb-periodic"]["ref_s"]   # the ref's copies are already there


@pytest.mark.parametrize("extra, needle", [
    (["--passes", "update,logprob"], "needs --model"),
    (["--passes", "update,critic", "--model", "deepseek-v2-lite"], "unknown pass critic"),
    (["--passes", "ref", "--model", "deepseek-v2-lite"], "must include update"),
    (["--passes", "update,ref", "--model", "deepseek-v2-lite", "--logprob-tokens-per-rank", "0"], "must be >= 1"),
    (["--passes", "update,ref", "--model", "deepseek-v2-lite", "--logprob-tokens-per-rank", "100"],
     "--logprob-tokens-per-rank 100 is less than the longest sequence"),
])
def test_passes_bad_input_exit_2(extra, needle, capsys):
    assert main(["simulate", *BOTH, "--ep", "8", "--gpus-per-node", "4", "--tokens-per-rank", "1024", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]

