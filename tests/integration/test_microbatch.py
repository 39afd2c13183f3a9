"""verl's own micro-batch preparation feeding relibra's loads and planner (single process)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from _data import v1_batch
from relibra_verl.config import RelibraConfig
from relibra_verl.integration.microbatch import MissingRoutes, local_route_rows, micro_batch_loads
from relibra_verl.planner.types import PlanError, Topology
from relibra_verl.planner.validate import validate_plan

E, K, L = 8, 2, 2
MOE = np.arange(L)


def test_loads_from_verl_micro_batches_exclude_unreplayed_rows():
    from verl.workers.engine.utils import prepare_micro_batches

    data = v1_batch(0, 6, E, K, L)
    micro_batches, _ = prepare_micro_batches(data, dp_group=None)
    assert len(micro_batches) >= 2
    total = 0
    for mb in micro_batches:
        lens = mb["input_ids"].offsets().diff().tolist()
        rows = local_route_rows(mb, num_experts=E, moe_layers=MOE, num_layers=L)
        assert rows.shape == (sum(lens), L, K)
        ends = np.cumsum(lens) - 1
        assert (rows[ends] == -1).all()                       # each sequence's last row: live router
        assert (np.delete(rows, ends, axis=0) >= 0).all()     # every other row is replayed, id known
        counts, unknown = micro_batch_loads(mb, num_experts=E, moe_layers=MOE, num_layers=L)
        assert counts.shape == (L, E) and (counts.sum(1) == (sum(lens) - len(lens)) * K).all()
        assert (unknown == len(lens) * K).all()
        total += counts.sum()
    assert total == sum((n - 1) * K * L for n in data["input_ids"].offsets().diff().tolist())
    mb = micro_batches[0].exclude("routed_experts")
    with pytest.raises(MissingRoutes):
        micro_batch_loads(mb, num_experts=E, moe_layers=MOE, num_layers=L)


def _trainer(cfg, G=2):
    from relibra_verl.integration.trainer import RelibraTrainer

    st = RelibraTrainer(cfg)
    st.topo = Topology(num_experts=E, ep_size=G, gpus_per_node=G, replica_slots=cfg.replica_slots)
    st.moe_layers, st.num_layers, st.ready = MOE, L, True
    plans = []

    def extend_plan(plan, error=None):   # the runtime raises a rank's error on every rank (a PlanError)
        if error is not None:
            raise PlanError(f"relibra plan rejected: extend_plan: {error}")
        plans.append(plan)

    st.runtime = types.SimpleNamespace(topo=st.topo, expert_at_home=np.tile(np.arange(E), (L, 1)), plans=plans,
                                       set_plan=plans.append, extend_plan=extend_plan,
                                       set_micro_batch=lambda m: None)  # runtime stand-in
    st._all_gather = lambda local: np.stack([local] * G)  # G ranks with the same (skewed) loads
    return st


def _engine(mode="R3", replay=True):
    return types.SimpleNamespace(engine_config=types.SimpleNamespace(router_replay=types.SimpleNamespace(mode=mode)),
                                 enable_routing_replay=replay, tf_config=types.SimpleNamespace(fp8=None),
                                 optimizer=None)


@pytest.mark.parametrize("shared_from_bytes", [1 << 16, 1])
def test_patched_prepare_micro_batches_plans_every_micro_batch(monkeypatch, shared_from_bytes):
    """shared_from_bytes 1: every array of the background plans comes back through shared memory."""
    import relibra_verl.integration.plugin  # noqa: F401  (registers the patches)
    from relibra_verl.integration import trainer as tr

    monkeypatch.setattr(tr, "_SHARED_RESULT_BYTES", shared_from_bytes)
    from verl.workers.engine.megatron import transformer_impl as ti
    from verl.utils import tensordict_utils as tu

    assert getattr(ti.prepare_micro_batches, "_relibra_wrapped", False)
    st = _trainer(RelibraConfig(enable=True, replica_slots=1))
    data = v1_batch(1, 8, E, K, L, skew=1.0)
    st.begin(_engine(), data, forward_only=False)
    try:
        micro_batches, _ = ti.prepare_micro_batches(data, dp_group=None)
        M = len(micro_batches)
        assert M > 1
        # micro-batch 0's replicas are installed before its forward; the others are planned beside it and
        # installed (extend_plan) before micro-batch 1's forward
        first = st.plan
        assert first is not None and first.num_micro_batches == 1 and st.runtime.plans == [first]
        assert "relibra/imbalance_after" not in st._metrics
        st.on_forward(micro_batches[0])
        assert st.runtime.plans == [first]
        st.on_forward(micro_batches[1])
    finally:
        st.end()
    tags = [tu.get_non_tensor_data(mb, key="relibra_micro_batch", default=None) for mb in micro_batches]
    assert tags == list(range(M))
    plan = st.plan
    assert plan is not None and plan.num_micro_batches == M and plan.num_layers == L
    assert st.runtime.plans == [first, plan]                                # installed in the runtime
    counts = np.stack([micro_batch_loads(mb, num_experts=E, moe_layers=MOE, num_layers=L)[0]
                       for mb in micro_batches])                            # [M, L, E] of "rank 0"
    full = np.stack([counts, counts], axis=2)                               # the two ranks all-gathered
    validate_plan(plan, full)
    # planned in two parts, the plan equals the planner's on the whole mini-batch
    from relibra_verl.planner.relibra import plan_relibra as _plan
    whole = _plan(full, st.topo, np.tile(np.arange(E), (L, 1)), mode="replicate", replication=st.replication)
    assert plan.digest() == whole.digest()
    m = st._metrics
    assert m["relibra/plan_ms_background"] > 0
    assert m["relibra/imbalance_after"] <= m["relibra/imbalance_before"] and m["relibra/imbalance_before"] > 1.0
    assert m["relibra/replicas"] > 0 and m["relibra/fallbacks"] == 0 and m["relibra/plan_ms"] >= 0
    # the next placement is planned in the background (a separate process), weighed with its replicas against
    # keeping the current one; collecting it waits for that plan, which equals the planner's own, in the foreground
    assert st._next_future is not None
    from relibra_verl.planner import plan_relibra
    want = plan_relibra(full, st.topo, np.tile(np.arange(E), (L, 1)), mode="both", replication=st.replication,
                        reorder=st.reorder).expert_at_home
    assert st.next_placement is not None and np.array_equal(st.next_placement, want)
    assert st._next_future is None
    out = {"metrics": {}}
    st.finish(out)
    assert set(out["metrics"]) >= {"relibra/imbalance_before", "relibra/imbalance_after", "relibra/plan_ms",
                                   "relibra/replicas", "relibra/fallbacks"}


@pytest.mark.parametrize("engine_kw, reason", [({"mode": "disabled"}, "R3 is off"),
                                               ({"mode": "R3", "replay": True}, "without routed_experts")])
def test_no_routes_falls_back_or_raises_in_strict_mode(engine_kw, reason, caplog):
    import relibra_verl.integration.plugin  # noqa: F401
    from verl.workers.engine.megatron import transformer_impl as ti

    from relibra_verl.integration.trainer import RelibraError

    data = v1_batch(2, 6, E, K, L, with_routes=engine_kw["mode"] != "R3")
    st = _trainer(RelibraConfig(enable=True))
    st.begin(_engine(**engine_kw), data, forward_only=False)
    try:
        with caplog.at_level("WARNING", logger="relibra_verl"):
            mbs, _ = ti.prepare_micro_batches(data, dp_group=None)
    finally:
        st.end()
    assert st.plan is None and st._metrics["relibra/fallbacks"] == len(mbs) == st.fallbacks_total
    assert st.runtime.plans == [None]                                       # layers told: plain dispatch
    assert reason in caplog.text
    strict = _trainer(RelibraConfig(enable=True, on_missing_routing="error"))
    strict.begin(_engine(**engine_kw), data, forward_only=False)
    try:
        with pytest.raises(RelibraError, match="on_missing_routing=error"):
            ti.prepare_micro_batches(data, dp_group=None)
    finally:
        strict.end()


def test_malformed_routes_raise_naming_micro_batch_sample_and_layer():
    import torch

    import relibra_verl.integration.plugin  # noqa: F401
    from verl.workers.engine.megatron import transformer_impl as ti

    from relibra_verl.integration.routes import RoutesError

    data = v1_batch(3, 6, E, K, L)
    parts = list(data["routed_experts"].unbind())
    parts[4] = parts[4].clone()
    parts[4][1, 1, 0] = E + 3  # sample 4, MoE layer 1
    data["routed_experts"] = torch.nested.as_nested_tensor(parts, layout=torch.jagged)
    st = _trainer(RelibraConfig(enable=True))
    st.begin(_engine(), data, forward_only=False)
    try:
        with pytest.raises(RoutesError, match=r"micro-batch \d+: sample \d+, layer 1 \(MoE layer 1\), token 1: "
                                              r"expert id 11 >= num_experts 8"):
            ti.prepare_micro_batches(data, dp_group=None)
    finally:
        st.end()


def test_worker_attach_validates_and_attaches_to_the_actor_engine_only(caplog):
    from omegaconf import OmegaConf
    from verl.workers.engine.megatron.transformer_impl import MegatronEngine

    from relibra_verl.config import RelibraConfigError
    from relibra_verl.integration.plugin import attach_from_worker
    from relibra_verl.integration.trainer import RelibraTrainer

    def worker(section, engine):
        cfg = OmegaConf.create({"actor": {"strategy": "megatron"}, "relibra": section})
        return types.SimpleNamespace(config=cfg, actor=types.SimpleNamespace(engine=engine))

    with pytest.raises(RelibraConfigError, match="did you mean 'mode'"):
        attach_from_worker(worker({"enable": True, "mdoe": "both"}, None), validate_only=True)
    eng = object.__new__(MegatronEngine)
    assert attach_from_worker(worker({"enable": False}, eng)) is None and not hasattr(eng, "_relibra")
    st = attach_from_worker(worker({"enable": True, "replica_slots": 1}, eng))
    assert isinstance(st, RelibraTrainer) and eng._relibra is st and st.cfg.replica_slots == 1
    assert attach_from_worker(worker({"enable": True}, eng)) is st          # idempotent (update_actor)
    with caplog.at_level("WARNING", logger="relibra_verl"):
        assert attach_from_worker(worker({"enable": True}, types.SimpleNamespace())) is None
    assert "Megatron engine only" in caplog.text


def test_a_failing_background_reorder_surfaces_after_the_optimizer_step():
    from concurrent.futures import Future

    st = _trainer(RelibraConfig(enable=True, replica_slots=1))
    failed = Future()
    failed.set_exception(PlanError("previous placement has shape (1, 2), expected (4, 8)"))
    st._next_future = failed
    with pytest.raises(PlanError, match="previous placement has shape"):
        st.after_optimizer_step(_engine())
    assert st._next_future is None and st.next_placement is None          # raised once, not again


def test_a_failing_background_replica_plan_surfaces_before_micro_batch_1(monkeypatch):
    import relibra_verl.integration.plugin  # noqa: F401
    from verl.workers.engine.megatron import transformer_impl as ti

    from relibra_verl.integration import trainer as tr

    real = tr.plan_relibra

    def plan(counts, *args, **kwargs):   # the second part (micro-batches 1..) fails, as a planner bug would
        if counts.shape[0] > 1 and kwargs.get("mode") == "replicate":
            raise PlanError("counts must be nonnegative")
        return real(counts, *args, **kwargs)

    monkeypatch.setattr(tr, "plan_relibra", plan)
    # the failure is injected in this process: plan in a thread of it (the error path is the pool's alike)
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(tr, "_planner_pool", ThreadPoolExecutor(max_workers=1))
    st = _trainer(RelibraConfig(enable=True, replica_slots=1, mode="replicate"))
    data = v1_batch(1, 12, E, K, L, skew=1.0)
    st.begin(_engine(), data, forward_only=False)
    try:
        micro_batches, _ = ti.prepare_micro_batches(data, dp_group=None)
        assert len(micro_batches) > 2
        st.on_forward(micro_batches[0])                                   # micro-batch 0 runs on its plan
        with pytest.raises(PlanError, match="nonnegative"):
            st.on_forward(micro_batches[1])
    finally:
        st.end()
    assert st._rest_future is None and len(st.runtime.plans) == 1         # nothing half-installed


def test_time_aware_limits_come_from_the_profile_and_reach_the_plan():
    import relibra_verl.integration.plugin  # noqa: F401
    from verl.workers.engine.megatron import transformer_impl as ti

    from relibra_verl.sim.planning import planner_limits
    from relibra_verl.sim.presets import get_preset
    from relibra_verl.sim.profiles import load_profile

    st = _trainer(RelibraConfig(enable=True, replica_slots=1, profile="h800-ib400"))
    assert st.replication.min_replica_tokens == 1 and st.reorder.move_cost_pairs == 0   # before setup: pair counts
    # Qwen3-30B-A3B's expert shape, as Megatron's TransformerConfig names it
    st._plan_for_time(types.SimpleNamespace(hidden_size=2048, moe_ffn_hidden_size=768, ffn_hidden_size=6144))
    want = planner_limits(get_preset("qwen3-30b-a3b"), load_profile("h800-ib400"), 1, 2)
    assert st.replication.min_replica_tokens == want["min_replica_tokens"] > 1
    assert st.replication.replica_overhead_pairs == want["replica_overhead_pairs"] > 0
    assert st.replication.inter_node_share == pytest.approx(want["inter_node_share"])
    assert st.replication.copy_cost_pairs == pytest.approx(want["copy_cost_pairs"])
    assert st.replication.copy_cost_pairs > 0
    assert st.reorder.move_cost_pairs == pytest.approx(want["move_cost_pairs"]) and st.reorder.move_cost_pairs > 0
    assert st.reorder.rank_move_cost_pairs == pytest.approx(want["rank_move_cost_pairs"])
    assert st.reorder.rank_move_cost_pairs > 0
    assert st.reorder.inter_node_share == st.cfg.inter_node_share == 0.0              # NIC-aware reorder: opt-in
    # micro-batches of ~4k tokens: enough pairs per expert for some replicas to repay their GEMM call
    data = v1_batch(1, 48, E, K, L, skew=1.0, max_len=1024, max_token_len=4096)
    st.begin(_engine(), data, forward_only=False)
    try:
        micro_batches, _ = ti.prepare_micro_batches(data, dp_group=None)
        for mb in micro_batches:
            st.on_forward(mb)
    finally:
        st.end()
    assert st.plan.num_micro_batches == len(micro_batches)
    q = st.plan.replica_quota.sum(-1)[st.plan.replica_expert >= 0]
    assert q.size and (q >= st.replication.min_replica_tokens).all()     # no replica below what repays it



def test_unreadable_replay_flag_and_unknown_micro_batch_are_counted_with_their_reason(monkeypatch, caplog):
    """No silent path: an exception while reading verl's routing-replay flag is a counted fallback (with its
    reason in the metric name), not a guess; a forward whose micro-batch has no relibra index is counted too;
    strict mode raises for both."""
    import relibra_verl.integration.plugin  # noqa: F401
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.megatron import transformer_impl as ti

    from relibra_verl.integration.trainer import RelibraError

    data = v1_batch(4, 6, E, K, L)
    real = tu.get_non_tensor_data

    def broken(*args, **kwargs):
        if kwargs.get("key") == "enable_routing_replay":
            raise KeyError("layout changed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tu, "get_non_tensor_data", broken)
    st = _trainer(RelibraConfig(enable=True))
    st.begin(_engine(), data, forward_only=False)
    try:
        with caplog.at_level("WARNING", logger="relibra_verl"):
            mbs, _ = ti.prepare_micro_batches(data, dp_group=None)
    finally:
        st.end()
    m = st._metrics
    assert st.plan is None and m["relibra/fallbacks"] == len(mbs)
    assert m["relibra/fallbacks/cannot_read_verl_s_enable_routing_replay_flag"] == len(mbs)
    assert "layout changed" in caplog.text
    strict = _trainer(RelibraConfig(enable=True, on_missing_routing="error"))
    strict.begin(_engine(), data, forward_only=False)
    try:
        with pytest.raises(RelibraError, match="enable_routing_replay flag"):
            ti.prepare_micro_batches(data, dp_group=None)
    finally:
        strict.end()
    monkeypatch.setattr(tu, "get_non_tensor_data", real)

    st = _trainer(RelibraConfig(enable=True))
    st.begin(_engine(), data, forward_only=False)
    try:
        mbs, _ = ti.prepare_micro_batches(data, dp_group=None)
        assert st.plan is not None
        st.on_forward(data)  # the mini-batch itself: a batch that carries no relibra index
    finally:
        st.end()
    assert st._metrics["relibra/fallbacks"] == 1.0
    assert st._metrics["relibra/fallbacks/micro_batch_without_relibra_s_index"] == 1.0


def test_unreadable_parallel_state_is_a_counted_fallback_on_every_rank(monkeypatch):
    """A Megatron parallel state that is initialised but cannot be read is not taken for TP 1 (which would
    count rows this rank never computes): the mini-batch falls back on every EP rank, also where only another
    rank failed, counted with its reason; strict mode raises."""
    import relibra_verl.integration.plugin  # noqa: F401
    from megatron.core import parallel_state as mpu
    from verl.workers.engine.megatron import transformer_impl as ti

    from relibra_verl.integration.microbatch import ParallelStateError, _model_parallel_sizes
    from relibra_verl.integration.trainer import RelibraError

    def unreadable():
        raise AttributeError("no tensor-parallel group in this layout")

    monkeypatch.setattr(mpu, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(mpu, "get_tensor_model_parallel_world_size", unreadable)
    with pytest.raises(ParallelStateError, match="tensor/context-parallel sizes"):
        _model_parallel_sizes()
    data = v1_batch(4, 6, E, K, L)
    st = _trainer(RelibraConfig(enable=True))
    st.begin(_engine(), data, forward_only=False)
    try:
        mbs, _ = ti.prepare_micro_batches(data, dp_group=None)
    finally:
        st.end()
    key = "relibra/fallbacks/cannot_read_megatron_s_parallel_sizes"
    assert st.plan is None and st._metrics["relibra/fallbacks"] == len(mbs) and st._metrics[key] == len(mbs)
    strict = _trainer(RelibraConfig(enable=True, on_missing_routing="error"))
    strict.begin(_engine(), data, forward_only=False)
    try:
        with pytest.raises(RelibraError, match=r"parallel sizes \(EP ranks \[0, 1\]; here: cannot read"):
            ti.prepare_micro_batches(data, dp_group=None)
    finally:
        strict.end()

    # only EP rank 1 fails: rank 0, whose own probe works, takes the same fallback from the gathered flag
    monkeypatch.undo()
    ok = _trainer(RelibraConfig(enable=True))
    gather = ok._all_gather

    def rank1_failed(local):
        both = gather(local).copy()
        both[1, ..., E] = -3
        return both

    ok._all_gather = rank1_failed
    ok.begin(_engine(), data, forward_only=False)
    try:
        mbs, _ = ti.prepare_micro_batches(data, dp_group=None)
    finally:
        ok.end()
    assert ok.plan is None and ok._metrics[key] == len(mbs)
