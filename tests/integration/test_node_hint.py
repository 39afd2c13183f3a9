"""The driver's expert -> node hint (`data_placement: locality`, key relibra_node_of_expert) on the worker: read
from the call's TensorDict as verl builds it from the batch (legacy DataProto.meta_info, V1 extra_info),
handed to the placement planned before the old-log-prob pass through verl's own prepare_micro_batches,
and ignored, said and counted, where it does not fit the engine."""
from __future__ import annotations

import types

import numpy as np
import pytest

from _data import v1_batch
from relibra_verl.config import RelibraConfig
from relibra_verl.integration.data_placement import HINT_KEY
from relibra_verl.planner import ReorderConfig
from relibra_verl.planner.types import Topology, invert_placement

E, K, L, G, g = 16, 2, 2, 4, 2          # two nodes of two EP ranks


def _hint(seed=5):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.repeat(np.arange(2), E // 2)) for _ in range(L)])


def _trainer(monkeypatch):
    from relibra_verl.integration import runtime_bridge as rb
    from relibra_verl.integration.trainer import RelibraTrainer

    st = RelibraTrainer(RelibraConfig(enable=True, mode="reorder", replica_slots=0, profile="none"))
    st.topo = Topology(num_experts=E, ep_size=G, gpus_per_node=g, replica_slots=0)
    st.moe_layers, st.num_layers, st.ready = np.arange(L), L, True
    # what the time-aware configuration sets (move costs: the hint is weighed, not only a tie-breaker)
    st.reorder = ReorderConfig(move_cost_pairs=40.0, rank_move_cost_pairs=5.0, inter_node_share=0.8)
    st.runtime = types.SimpleNamespace(topo=st.topo, expert_at_home=np.tile(np.arange(E), (L, 1)),
                                       set_plan=lambda plan: None, set_micro_batch=lambda m: None)
    st._all_gather = lambda local: np.stack([local] * G)

    def apply_placement(runtime, placement, optimizer=None):     # the runtime's migration, recorded
        moved = int((invert_placement(runtime.expert_at_home) // 4 != invert_placement(placement) // 4).sum())
        runtime.expert_at_home = np.asarray(placement)
        return moved

    monkeypatch.setattr(rb, "apply_placement", apply_placement)
    return st


def _engine():
    return types.SimpleNamespace(engine_config=types.SimpleNamespace(router_replay=types.SimpleNamespace(mode="R3")),
                                 enable_routing_replay=True, tf_config=types.SimpleNamespace(fp8=None),
                                 optimizer=None, _is_offload_optimizer=False)


def _logprob_pass(st, hint):
    """verl's old-log-prob call: the batch with the hint as verl passes meta_info / extra_info, its real
    prepare_micro_batches (patched: relibra plans and places before the first forward)."""
    import relibra_verl.integration.plugin  # noqa: F401  (registers the patches)
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.megatron import transformer_impl as ti

    data = v1_batch(0, 24, E, K, L)
    tu.assign_non_tensor(data, enable_routing_replay=True)
    if hint is not None:
        tu.assign_non_tensor_data(tensor_dict=data, key=HINT_KEY, val=hint)
    st.begin(_engine(), data, forward_only=True)
    try:
        ti.prepare_micro_batches(data, dp_group=None)
    finally:
        st.end()
    return np.asarray(st.topo.node_of_rank)[invert_placement(st.runtime.expert_at_home) // st.topo.S]


def test_the_placement_before_the_logprob_pass_follows_the_hint(monkeypatch):
    hint = _hint()
    without = _logprob_pass(_trainer(monkeypatch), None)
    st = _trainer(monkeypatch)
    with_hint = _logprob_pass(st, hint)
    assert (with_hint == hint).mean() > 0.8 and (with_hint == hint).mean() > (without == hint).mean()
    assert st._metrics["relibra/node_hint_ignored"] == 0.0


@pytest.mark.parametrize("bad, said", [(np.zeros((L, E - 2), np.int64), "is not [2 MoE layers, 16 experts]"),
                                       (np.full((L, E), 2, np.int64), "holds node ids outside [0, 2)"),
                                       # 8 experts per node over both layers, but all on one node in each
                                       (np.repeat([[0], [1]], E, axis=1),
                                        "does not put 8 experts on each of 2 nodes in every layer")])
def test_a_hint_that_does_not_fit_is_ignored_said_and_counted(monkeypatch, caplog, bad, said):
    without = _logprob_pass(_trainer(monkeypatch), None)
    st = _trainer(monkeypatch)
    placed = _logprob_pass(st, bad)
    assert (placed == without).all() and st._metrics["relibra/node_hint_ignored"] == 1.0
    assert said in caplog.text


def test_the_hint_reaches_the_worker_from_both_trainers():
    """legacy: DataProto.meta_info -> to_tensordict; V1: KVBatchMeta.extra_info -> assign_non_tensor_data;
    both survive verl's split of the call over DP ranks (TensorDict.chunk)."""
    import torch
    from verl import DataProto
    from verl.utils import tensordict_utils as tu

    from relibra_verl.integration.trainer import _non_tensor

    hint = _hint()
    legacy = DataProto.from_dict(tensors={"x": torch.zeros(4, 2)}, meta_info={HINT_KEY: hint})
    v1 = tu.get_tensordict(tensor_dict={"x": torch.zeros(4, 2)}, non_tensor_dict={})
    tu.assign_non_tensor_data(tensor_dict=v1, key=HINT_KEY, val=hint)
    for td in (legacy.to_tensordict(), v1):
        assert np.array_equal(_non_tensor(td.chunk(2)[1], HINT_KEY), hint)
    assert _non_tensor(tu.get_tensordict(tensor_dict={"x": torch.zeros(4, 2)}, non_tensor_dict={}), HINT_KEY) is None
