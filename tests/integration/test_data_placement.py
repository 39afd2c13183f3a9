"""Routing-aware data placement in verl's driver: the real RayPPOTrainer._balance_batch of verl 0.9.1,
wrapped by relibra_verl.integration.data_placement, on a real DataProto."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def ray_trainer():
    import relibra_verl.integration.plugin  # noqa: F401  (the import hook patches ray_trainer on import)
    from verl.trainer.ppo import ray_trainer

    from relibra_verl.integration.data_placement import patch_ray_trainer

    patch_ray_trainer(ray_trainer)                                       # idempotent
    assert ray_trainer.RayPPOTrainer._relibra_data_placement
    return ray_trainer


def _batch(seed=0, B=16, T=12, L_all=3, K=2, E=16):
    """Two domains (even sequences route to experts 0-7, odd ones to 8-15), layer 1 dense (routes 0),
    right-padded sequences of random lengths; verl's round robin of the domains is blind to them."""
    from verl import DataProto

    rng = np.random.default_rng(seed)
    lens = rng.integers(4, T + 1, size=B)
    mask = (np.arange(T)[None] < lens[:, None]).astype(np.int64)
    routes = np.zeros((B, T, L_all, K), np.int16)
    for b in range(B):
        pool = np.arange(8) + 8 * (b % 2)
        for t in range(lens[b]):
            for l in (0, 2):
                routes[b, t, l] = rng.choice(pool, size=K, replace=False)
    return DataProto.from_dict(tensors={"attention_mask": torch.from_numpy(mask),
                                        "input_ids": torch.arange(B * T).reshape(B, T),
                                        "routed_experts": torch.from_numpy(routes)})


def _trainer(placement="locality", enable=False, dp=4):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"actor_rollout_ref": {
        "actor": {"ppo_mini_batch_size": 4, "megatron": {"expert_model_parallel_size": dp, "tensor_model_parallel_size": 1,
                                                         "pipeline_model_parallel_size": 1, "context_parallel_size": 1}},
        "rollout": {"n": 2},
        "relibra": {"data_placement": placement, "gpus_per_node": 2, "enable": enable, "profile": "none"}}})
    return types.SimpleNamespace(config=cfg, actor_rollout_wg=None, _get_dp_size=lambda wg, role: dp)


def _ranks_and_minibatches(batch, dp=4, per_mb=2):
    """verl's dispatch: rank r holds rows [r * B / dp, (r + 1) * B / dp); the worker cuts them into mini-batches
    of per_mb rows in order. Returns {mini-batch: set of sequence ids}, [B] rank of each sequence id."""
    ids = batch.batch["input_ids"][:, 0].numpy() // batch.batch["input_ids"].shape[1]
    per_rank = len(ids) // dp
    mbs, rank = {}, np.empty(len(ids), np.int64)
    for pos, s in enumerate(ids):
        mbs.setdefault((pos % per_rank) // per_mb, set()).add(int(s))
        rank[s] = pos // per_rank
    return mbs, rank


def test_verl_placement_is_untouched(ray_trainer):
    native = ray_trainer.RayPPOTrainer._balance_batch.__wrapped__
    a, b = _batch(), _batch()
    ma, mb = {}, {}
    native(_trainer("verl"), a, metrics=ma)
    ray_trainer.RayPPOTrainer._balance_batch(_trainer("verl"), b, metrics=mb)
    assert torch.equal(a.batch["input_ids"], b.batch["input_ids"]) and ma == mb


def test_locality_keeps_minibatches_and_counts_and_keeps_pairs_on_their_node(ray_trainer):
    native = ray_trainer.RayPPOTrainer._balance_batch.__wrapped__
    verl_batch, ours = _batch(), _batch()
    mv, mo = {}, {}
    native(_trainer("verl"), verl_batch, metrics=mv)
    ray_trainer.RayPPOTrainer._balance_batch(_trainer("locality"), ours, metrics=mo)
    verl_mbs, verl_rank = _ranks_and_minibatches(verl_batch)
    our_mbs, our_rank = _ranks_and_minibatches(ours)
    assert our_mbs == verl_mbs                                           # the same mini-batches
    assert (our_rank != verl_rank).any()                                 # ... on other ranks
    # Megatron's layout on 2 nodes of 2 EP ranks: experts 0-7 on node 0; even sequences belong there
    node = our_rank // 2
    assert mo["relibra/data_placement_fell_back"] == 0.0
    assert mo["relibra/inter_node_fraction"] < 0.5 * mo["relibra/inter_node_fraction_verl"]
    assert (node[0::2] == 0).mean() > 0.7 and (node[1::2] == 1).mean() > 0.7
    # verl's balance metrics, recomputed on the placement used; the data's tensors travel with their rows
    assert {k for k in mv} <= {k for k in mo}
    assert all(mo[k] == mv[k] for k in mv if "/balanced_" not in k)
    assert "relibra_node_of_expert" not in ours.meta_info               # relibra's reorder off: experts stay
    for row in range(len(ours)):
        s = int(ours.batch["input_ids"][row, 0]) // 12
        assert torch.equal(ours.batch["routed_experts"][row], _batch().batch["routed_experts"][s])


def test_expert_nodes_handed_to_the_workers_when_relibra_reorders(ray_trainer):
    batch, metrics = _batch(1), {}
    ray_trainer.RayPPOTrainer._balance_batch(_trainer("locality", enable=True), batch, metrics=metrics)
    hint = batch.meta_info.get("relibra_node_of_expert")
    assert metrics["relibra/data_placement_fell_back"] == 0.0
    # [MoE layers, experts]: the dense layer is left out; each domain's experts share a node
    assert hint.shape == (2, 16) and (np.bincount(hint.reshape(-1), minlength=2) == 16).all()
    assert (hint[:, :8] == hint[:, :1]).all() and (hint[:, 8:] == hint[:, 8:9]).all() and (hint[:, 0] != hint[:, 8]).all()


def test_without_routes_falls_back_and_says_so(ray_trainer):
    batch = _batch()
    batch.batch = batch.batch.exclude("routed_experts")
    before = batch.batch["input_ids"].clone()
    native = ray_trainer.RayPPOTrainer._balance_batch.__wrapped__
    ref, metrics = _batch(), {}
    native(_trainer("verl"), ref, metrics={})
    ray_trainer.RayPPOTrainer._balance_batch(_trainer("locality"), batch, metrics=metrics)
    assert metrics["relibra/data_placement_fell_back"] == 1.0
    assert torch.equal(batch.batch["input_ids"], ref.batch["input_ids"]) and not torch.equal(before, ref.batch["input_ids"])


def test_config_key_is_validated():
    from relibra_verl.config import RelibraConfig, RelibraConfigError

    assert RelibraConfig().data_placement == "verl"
    assert RelibraConfig.from_mapping({"data_placement": "locality"}).data_placement == "locality"
    with pytest.raises(RelibraConfigError, match="data_placement"):
        RelibraConfig.from_mapping({"data_placement": "nearest"})
