"""Routing-aware data placement in verl 0.9.1's default V1 trainer: the real PPOTrainer._balance_batch of
verl.trainer.ppo.v1.trainer_base (with verl's own padding to the batch multiple), wrapped by
relibra_verl.integration.data_placement, on a real transfer_queue KVBatchMeta. TransferQueue's store is
an in-memory stand-in for `kv_batch_get` / `kv_batch_put` (the real one needs Ray actors), holding every
sample as verl's agent loop puts it: one unpadded `routed_experts` [seq_len, L_all, K] per sample, stacked
by verl's own list_of_dict_to_tensordict."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

T_MAX, L_ALL, K, E = 12, 3, 2, 16


@pytest.fixture(scope="module")
def v1():
    import relibra_verl.integration.plugin  # noqa: F401  (the import hook patches the V1 trainer on import)
    from verl.trainer.ppo.v1 import trainer_base

    from relibra_verl.integration.data_placement import patch_v1_trainer

    patch_v1_trainer(trainer_base)                                       # idempotent
    assert trainer_base.PPOTrainer._relibra_data_placement
    return trainer_base


class _Store:
    """TransferQueue's kv_batch_get / kv_batch_put over a dict {key: {field: tensor}}."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.reads: list[list[str]] = []

    def put(self, keys, partition_id, fields=None, tags=None):
        for i, key in enumerate(keys):
            self.rows[key] = {name: fields[name][i] if not getattr(fields[name], "is_nested", False)
                              else fields[name].unbind(0)[i] for name in fields.keys()}

    def get(self, keys, partition_id, select_fields=None):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        self.reads.append(list(select_fields or []))
        names = select_fields or list(self.rows[keys[0]])
        missing = [n for n in names if n not in self.rows[keys[0]]]
        if missing:                                  # what TransferQueue raises for a field it never got
            raise ValueError(f"fields {missing} not found in partition {partition_id}")
        return list_of_dict_to_tensordict([{n: self.rows[k][n] for n in names} for k in keys])


@pytest.fixture
def store(monkeypatch):
    import transfer_queue

    s = _Store()
    monkeypatch.setattr(transfer_queue, "kv_batch_get", s.get)
    monkeypatch.setattr(transfer_queue, "kv_batch_put", s.put)
    return s


def _batch(store, seed=0, B=16, with_routes=True):
    """Two domains (even samples route to experts 0-7, odd ones to 8-15), layer 1 dense (routes 0), random
    lengths; verl's balancing is blind to the domains."""
    from transfer_queue import KVBatchMeta

    rng = np.random.default_rng(seed)
    keys, tags = [], []
    lens = rng.integers(4, T_MAX + 1, size=B)
    for b in range(B):
        n = int(lens[b])
        routes = np.zeros((n, L_ALL, K), np.int16)
        pool = np.arange(8) + 8 * (b % 2)
        for t in range(n):
            for layer in (0, 2):
                routes[t, layer] = rng.choice(pool, size=K, replace=False)
        row = {"input_ids": torch.full((n,), b, dtype=torch.int64)}
        if with_routes:
            row["routed_experts"] = torch.from_numpy(routes)
        keys.append(f"uid{b}_0_0")
        store.rows[keys[-1]] = row
        tags.append({"status": "success", "prompt_len": 2, "response_len": n - 2, "seq_len": n})
    return KVBatchMeta(keys=keys, tags=tags, partition_id="train", extra_info={})


def _trainer(v1, placement="locality", enable=False, dp=4, mini=4, critic_mini=None):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "trainer": {"critic_warmup": 0},
        "critic": {"ppo_mini_batch_size": critic_mini or mini},
        "actor_rollout_ref": {
            "model": {"path": "unused"},
            "actor": {"ppo_mini_batch_size": mini, "shuffle": False,
                      "megatron": {"expert_model_parallel_size": dp, "tensor_model_parallel_size": 1,
                                   "pipeline_model_parallel_size": 1, "context_parallel_size": 1}},
            "rollout": {"n": 2},
            "relibra": {"data_placement": placement, "gpus_per_node": 2, "enable": enable, "profile": "none"}}})
    t = types.SimpleNamespace(config=cfg, use_critic=critic_mini is not None, global_steps=1,
                              tokenizer=types.SimpleNamespace(eos_token_id=0), _relibra_num_experts=E,
                              actor_rollout_wg=types.SimpleNamespace(_dispatch_info={"actor": list(range(dp))}))
    t._get_required_batch_multiple = types.MethodType(v1.PPOTrainer._get_required_batch_multiple, t)
    return t


def _ids(batch, store):
    return np.array([int(store.rows[k]["input_ids"][0]) for k in batch.keys])


def _ranks_and_minibatches(batch, store, dp=4, per_mb=2):
    """verl's dispatch (KVBatchMeta.chunk: rank r holds the r-th contiguous chunk), cut into mini-batches of
    per_mb rows in order by the worker. Returns {mini-batch: set of sample ids}, {sample id: rank}."""
    ids = _ids(batch, store)
    per_rank = len(ids) // dp
    chunks = batch.chunk(dp)
    assert [len(c) for c in chunks] == [per_rank] * dp
    mbs, rank = {}, {}
    for r, chunk in enumerate(chunks):
        for pos, key in enumerate(chunk.keys):
            s = int(store.rows[key]["input_ids"][0])
            mbs.setdefault(pos // per_mb, set()).add(s)
            rank[s] = r
    return mbs, rank


def test_verl_placement_is_untouched(v1, store):
    native = v1.PPOTrainer._balance_batch.__wrapped__
    a, b = _batch(store), _batch(store)
    ma, mb = {}, {}
    a = native(_trainer(v1, "verl"), a, metrics=ma)
    b = v1.PPOTrainer._balance_batch(_trainer(v1, "verl"), b, metrics=mb)
    assert a.keys == b.keys and ma == mb
    assert not any("routed_experts" in r for r in store.reads)          # nothing read from TransferQueue


def test_locality_keeps_minibatches_and_counts_and_keeps_pairs_on_their_node(v1, store, monkeypatch):
    from relibra_verl.integration import data_placement

    monkeypatch.setattr(data_placement, "V1_READ_CHUNK", 5)             # 16 samples: read in 4 chunks
    native = v1.PPOTrainer._balance_batch.__wrapped__
    mv, mo = {}, {}
    verl_batch = native(_trainer(v1, "verl"), _batch(store), metrics=mv)
    ours = v1.PPOTrainer._balance_batch(_trainer(v1), _batch(store), metrics=mo)
    verl_mbs, verl_rank = _ranks_and_minibatches(verl_batch, store)
    our_mbs, our_rank = _ranks_and_minibatches(ours, store)
    assert our_mbs == verl_mbs                                           # the same mini-batches
    assert our_rank != verl_rank                                         # ... on other ranks
    assert mo["relibra/data_placement_fell_back"] == 0.0
    assert mo["relibra/inter_node_fraction"] < 0.5 * mo["relibra/inter_node_fraction_verl"]
    # Megatron's layout on 2 nodes of 2 EP ranks: experts 0-7 on node 0, where the even samples belong
    node = {s: r // 2 for s, r in our_rank.items()}
    assert np.mean([node[s] == s % 2 for s in node]) > 0.7
    assert {k for k in mv} <= {k for k in mo}
    assert all(mo[k] == mv[k] for k in mv if "/balanced_" not in k)
    # the tags travel with their keys; the routes were read a chunk at a time, routed_experts only
    assert [t["seq_len"] for t in ours.tags] == [len(store.rows[k]["input_ids"]) for k in ours.keys]
    assert store.reads.count(["routed_experts"]) == 4 and "relibra_node_of_expert" not in ours.extra_info


def test_verls_padding_samples_count_no_pairs_and_hint_reaches_extra_info(v1, store):
    """14 samples on 4 ranks with mini-batches of 4: verl pads to 16 with its synthetic samples (zero routes
    copied from sample 0's shape); the planner places them without pairs; with relibra's reorder on, the
    experts' nodes go to the workers in extra_info."""
    metrics = {}
    batch = v1.PPOTrainer._balance_batch(_trainer(v1, enable=True), _batch(store, seed=1, B=14), metrics=metrics)
    assert len(batch) == 16 and sum(t.get("is_padding", False) for t in batch.tags) == 2
    assert metrics["relibra/data_placement_fell_back"] == 0.0
    hint = batch.extra_info["relibra_node_of_expert"]
    assert hint.shape == (2, E) and (np.bincount(hint.reshape(-1), minlength=2) == E).all()
    assert (hint[:, :8] == hint[:, :1]).all() and (hint[:, 8:] == hint[:, 8:9]).all() and (hint[:, 0] != hint[:, 8]).all()


def test_critic_minibatches_are_kept_too(v1, store):
    """With a critic whose mini-batches are half the actor's, a sample moves only inside both of its own."""
    native = v1.PPOTrainer._balance_batch.__wrapped__
    verl_batch = native(_trainer(v1, "verl", mini=4, critic_mini=2), _batch(store, B=32), metrics={})
    metrics = {}
    ours = v1.PPOTrainer._balance_batch(_trainer(v1, mini=4, critic_mini=2), _batch(store, B=32), metrics=metrics)
    assert metrics["relibra/data_placement_fell_back"] == 0.0
    for per_mb in (2, 1):                                                # actor: 2 rows per rank, critic: 1
        assert _ranks_and_minibatches(ours, store, per_mb=per_mb)[0] == \
            _ranks_and_minibatches(verl_batch, store, per_mb=per_mb)[0]


def test_without_routes_falls_back_and_says_so(v1, store):
    native = v1.PPOTrainer._balance_batch.__wrapped__
    ref = native(_trainer(v1, "verl"), _batch(store, with_routes=False), metrics={})
    metrics = {}
    batch = v1.PPOTrainer._balance_batch(_trainer(v1), _batch(store, with_routes=False), metrics=metrics)
    assert metrics["relibra/data_placement_fell_back"] == 1.0
    assert batch.keys == ref.keys and "relibra/inter_node_fraction" not in metrics


def test_plugin_patches_the_v1_trainer_on_import():
    import relibra_verl.integration.plugin as plugin
    from verl.trainer.ppo.v1 import trainer_base  # noqa: F401

    assert "verl.trainer.ppo.v1.trainer_base" in plugin.status()["patched"]
