"""Trace loading/validation and the verl-style micro-batch split."""
import json

import numpy as np
import pytest

from relibra_verl.errors import TraceError, UsageError
from relibra_verl.routing.loads import (count_loads, counts_from_routes, form_batch, split_micro_batches,
                                        verl_workload)
from relibra_verl.routing.trace import load_trace, save_trace, trace_from_arrays


def _arrays(T=10, L=3, K=2, E=8, seqs=(4, 6), seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    return {"expert_ids": ids.astype(np.int16), "seq_offsets": np.r_[0, np.cumsum(seqs)].astype(np.int64),
            "meta": np.array(json.dumps({"num_experts": E, "topk": K}))}


@pytest.mark.parametrize("name", ["bundled:esft_intent", "bundled:esft_law"])
def test_bundled_traces_load(name):
    t = load_trace(name)
    assert (t.num_layers, t.topk, t.num_experts) == (26, 6, 64)
    assert t.seq_offsets[-1] == t.num_tokens > 8000
    assert t.expert_ids.min() >= 0 and t.expert_ids.max() < 64


def test_roundtrip(tmp_path):
    t = trace_from_arrays(_arrays(), name="x")
    save_trace(tmp_path / "t.npz", t)
    back = load_trace(str(tmp_path / "t.npz"))
    np.testing.assert_array_equal(back.expert_ids, t.expert_ids)
    np.testing.assert_array_equal(back.seq_offsets, t.seq_offsets)
    assert back.num_experts == 8


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(expert_ids=np.where(a["expert_ids"] == 3, 8, a["expert_ids"])), "expert_ids` has id 8"),
    (lambda a: a.update(expert_ids=a["expert_ids"][:, 0]), "must be 3-D"),
    (lambda a: a.update(expert_ids=a["expert_ids"].astype(np.float32)), "integers"),
    (lambda a: a.update(seq_offsets=np.array([0, 4, 9])), "seq_offsets` must run from 0 to the token count 10"),
    (lambda a: a.update(seq_offsets=np.array([0, 6, 6, 10])), "not strictly increasing"),
    (lambda a: a.pop("seq_offsets"), "seq_offsets` is missing"),
    (lambda a: a.update(meta=np.array("{not json")), "meta` is not valid JSON"),
    (lambda a: a.update(expert_ids=np.where(a["expert_ids"] >= 0, a["expert_ids"], 0) * 0), "repeats expert 0"),
])
def test_malformed_traces_name_the_array(tmp_path, mutate, message):
    a = _arrays()
    mutate(a)
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(TraceError, match=message) as exc:
        load_trace(str(path))
    assert str(path) in str(exc.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not a readable npz"):
        load_trace(str(tmp_path / "junk.npz"))
    with pytest.raises(TraceError, match="unknown bundled trace"):
        load_trace("bundled:nope")


def test_masked_routes_are_not_counted():
    ids = np.array([[[0, 1]], [[-1, 2]], [[1, -1]]])
    np.testing.assert_array_equal(counts_from_routes(ids, 4), [[1, 2, 1, 0]])


def test_split_keeps_sequences_whole_and_respects_budget():
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 300, size=57)
    split = split_micro_batches(lens, 4, 512)
    seen = np.concatenate([s for mb in split.seqs for s in mb])
    np.testing.assert_array_equal(np.sort(seen), np.arange(57))           # every sequence exactly once
    for mb in split.seqs:
        assert len(mb) == 4
        for s in mb:
            assert lens[s].sum() <= 512
    per_rank = [sum(lens[mb[r]].sum() for mb in split.seqs) for r in range(4)]
    assert max(per_rank) - min(per_rank) <= lens.max()                    # balanced over ranks
    assert split.num_micro_batches >= -(-max(per_rank) // 512)


def test_split_rejects_sequence_longer_than_budget():
    with pytest.raises(UsageError, match="sequence 1 has 600 tokens"):
        split_micro_batches(np.array([10, 600, 20]), 2, 512)


def test_workload_matches_verl():
    from verl.utils.seqlen_balancing import calculate_workload
    import torch
    lens = np.array([1, 17, 512, 4096])
    np.testing.assert_array_equal(verl_workload(lens), calculate_workload(torch.tensor(lens)).numpy())


def test_counts_match_brute_force():
    trace = trace_from_arrays(_arrays(T=40, seqs=(5, 7, 3, 9, 6, 10)), name="x")
    split = split_micro_batches(trace.seq_lens(), 2, 16)
    counts = count_loads(trace, split)
    M, L, G, E = counts.shape
    expect = np.zeros_like(counts)
    for m in range(M):
        for r in range(G):
            for s in split.seqs[m][r]:
                for t in range(trace.seq_offsets[s], trace.seq_offsets[s + 1]):
                    for l in range(L):
                        for e in trace.expert_ids[t, l]:
                            expect[m, l, r, e] += 1
    np.testing.assert_array_equal(counts, expect)
    assert counts.sum() == trace.expert_ids.size


def test_batches_are_seeded():
    traces = [load_trace("bundled:esft_law")]
    a, b = form_batch(traces, seed=3), form_batch(traces, seed=3)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    c = form_batch(traces, seed=4)
    assert not np.array_equal(a.seq_lens(), c.seq_lens())
    r = form_batch(traces, seed=0, resample=50, max_seq_len=400)
    assert r.num_seqs == 50 and r.seq_lens().max() <= 400
