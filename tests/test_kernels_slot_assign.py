"""assign_slots: Triton (interpreter on CPU) against the plain-torch reference and a loop oracle of the rule.

The interpreter is enabled per test through the environment (monkeypatch): the kernels build their
interpreted variant lazily, so import order with other test modules does not matter.
"""
import numpy as np
import pytest
import torch

from relibra_verl.kernels import assign_slots, assign_slots_reference, resolve_backend
from relibra_verl.planner.types import BatchPlan, Topology


def oracle(ids, copy_slot, quota, num_slots):
    """The rule of design.md "Terms", pair by pair in row-major order."""
    ids, cs, q = ids.tolist(), copy_slot.tolist(), quota.tolist()
    seen = {}
    out = []
    counts = [0] * num_slots
    for row in ids:
        out_row = []
        for e in row:
            if e < 0:
                out_row.append(-1)
                continue
            i = seen.get(e, 0)
            seen[e] = i + 1
            c, lo = 0, 0
            for cc, qq in enumerate(q[e]):
                if lo <= i < lo + qq:
                    c = cc
                    break
                lo += qq
            out_row.append(cs[e][c])
            counts[cs[e][c]] += 1
        out.append(out_row)
    return out, counts


def random_tables(gen, E, C, num_slots, max_quota, home_quota=False):
    """copy_slot [E, C]: distinct slots per copy, some replicas absent; quota [E, C] (0 where absent)."""
    perm = torch.randperm(num_slots, generator=gen)
    copy_slot = torch.full((E, C), -1, dtype=torch.int64)
    copy_slot.view(-1)[: min(E * C, num_slots)] = perm[: min(E * C, num_slots)]
    copy_slot[:, 0] = torch.randint(0, num_slots, (E,), generator=gen)  # homes always present
    absent = torch.rand(E, C, generator=gen) < 0.3
    absent[:, 0] = False
    copy_slot[absent] = -1
    quota = torch.randint(0, max_quota + 1, (E, C), generator=gen)
    quota[copy_slot < 0] = 0
    if not home_quota:
        quota[:, 0] = 0
    return copy_slot, quota


def check_all(ids, copy_slot, quota, num_slots, device="cpu"):
    ids, copy_slot, quota = ids.to(device), copy_slot.to(device), quota.to(device)
    slot_t, counts_t = assign_slots(ids, copy_slot, quota, num_slots, backend="triton")
    slot_r, counts_r = assign_slots_reference(ids, copy_slot, quota, num_slots)
    want, want_counts = oracle(ids, copy_slot, quota, num_slots)
    assert slot_r.dtype == slot_t.dtype == counts_t.dtype == torch.int64
    assert slot_r.tolist() == want and counts_r.tolist() == want_counts
    assert torch.equal(slot_t, slot_r), (slot_t, slot_r)
    assert torch.equal(counts_t, counts_r)
    assert slot_t.device == ids.device
    # every routed pair lands in exactly one slot
    assert int(counts_t.sum()) == int((ids >= 0).sum())
    return slot_t.cpu(), counts_t.cpu()


CASES = [  # T, K, E, C, num_slots, mask fraction, max quota
    (0, 8, 4, 2, 6, 0.0, 3),
    (1, 1, 1, 1, 1, 0.0, 0),
    (5, 1, 3, 2, 8, 0.2, 2),
    (37, 2, 5, 3, 20, 0.1, 6),
    (64, 8, 16, 4, 40, 0.0, 20),  # 512 pairs: four rank blocks
    (33, 8, 8, 2, 16, 0.5, 9),
    (130, 3, 7, 1, 7, 0.05, 0),  # no replicas at all
    (21, 6, 12, 3, 200, 0.0, 4),  # most slots empty, K not a power of two
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_matches_reference_and_rule(interp, device, case, seed):
    T, K, E, C, ns, mask, mq = case
    gen = torch.Generator().manual_seed(seed * 1000 + T)
    ids = torch.randint(0, E, (T, K), generator=gen)
    ids[torch.rand(T, K, generator=gen) < mask] = -1
    copy_slot, quota = random_tables(gen, E, C, ns, mq, home_quota=seed == 1)
    check_all(ids.to(torch.int32), copy_slot, quota, ns, device=device)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_id_dtypes(interp, device, dtype):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-1, 6, (19, 4), generator=gen).to(dtype)
    copy_slot, quota = random_tables(gen, 6, 3, 12, 5)
    check_all(ids, copy_slot.to(torch.int32), quota.to(torch.int32), 12, device=device)


def test_uint8_ids_and_small_table_dtypes(interp, device):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 6, (11, 2), generator=gen).to(torch.uint8)
    copy_slot, quota = random_tables(gen, 6, 2, 9, 3)
    check_all(ids, copy_slot.to(torch.int16), quota.to(torch.int16), 9, device=device)


def test_all_masked(interp, device):
    ids = torch.full((9, 8), -1, dtype=torch.int64)
    copy_slot = torch.tensor([[0, 2], [1, -1]])
    quota = torch.tensor([[0, 3], [0, 0]])
    slot, counts = check_all(ids, copy_slot, quota, 4, device=device)
    assert (slot == -1).all() and counts.tolist() == [0, 0, 0, 0]


def test_one_expert_takes_every_token(interp, device):
    T, K = 40, 8
    ids = torch.full((T, K), 2, dtype=torch.int32)  # every pair to expert 2 (320 pairs, 3 blocks)
    copy_slot = torch.tensor([[0, -1, -1], [1, -1, -1], [2, 5, 7], [3, -1, -1]])
    quota = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 100, 150], [0, 0, 0]])
    slot, counts = check_all(ids, copy_slot, quota, 8, device=device)
    flat = slot.view(-1)
    assert (flat[:100] == 5).all() and (flat[100:250] == 7).all() and (flat[250:] == 2).all()
    assert counts.tolist() == [0, 0, 70, 0, 0, 100, 0, 150]


def test_home_quota_first(interp, device):
    """quota[e, 0] > 0: the first pairs go home explicitly, then the replicas, the rest home again."""
    ids = torch.zeros(10, 1, dtype=torch.int64)
    copy_slot = torch.tensor([[4, 1, 2]])
    quota = torch.tensor([[2, 3, 1]])
    slot, _ = check_all(ids, copy_slot, quota, 5, device=device)
    assert slot.view(-1).tolist() == [4, 4, 1, 1, 1, 2, 4, 4, 4, 4]


def test_quotas_exceed_routing(interp, device):
    """A plan for more pairs than routed: replicas get only what exists, in order, nothing is lost."""
    ids = torch.tensor([[0, 1], [1, 0], [0, -1]])
    copy_slot = torch.tensor([[0, 2, 3], [1, 3, -1]])
    quota = torch.tensor([[0, 2, 50], [0, 1, 0]])
    slot, counts = check_all(ids, copy_slot, quota, 4, device=device)
    assert slot.tolist() == [[2, 3], [1, 2], [3, -1]]
    assert counts.tolist() == [0, 1, 2, 2]


def test_deterministic(interp, device):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, 16, (70, 8), generator=gen)
    copy_slot, quota = random_tables(gen, 16, 4, 64, 30)
    ids, copy_slot, quota = ids.to(device), copy_slot.to(device), quota.to(device)
    a = assign_slots(ids, copy_slot, quota, 64, backend="triton")
    b = assign_slots(ids, copy_slot, quota, 64, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_with_batch_plan_copy_tables(interp, device):
    """The tables BatchPlan.copy_tables produces drive the kernel directly."""
    topo = Topology(num_experts=8, ep_size=4, gpus_per_node=2, replica_slots=1)
    M, L, G, R = 1, 1, 4, 1
    replica_expert = np.full((M, L, G, R), -1)
    replica_expert[0, 0, 1, 0] = 0  # rank 1 (same node as rank 0) hosts a copy of expert 0
    replica_expert[0, 0, 3, 0] = 5  # rank 3 hosts a copy of expert 5 (home rank 2)
    replica_quota = np.zeros((M, L, G, R, G), dtype=np.int64)
    replica_quota[0, 0, 1, 0, 2] = 4  # source rank 2 sends 4 of its expert-0 pairs to rank 1's replica
    replica_quota[0, 0, 3, 0, 2] = 2
    plan = BatchPlan(topo, np.arange(8)[None].copy(), replica_expert, replica_quota, np.zeros(1, dtype=np.int64))
    copy_slot, quota = (torch.from_numpy(a) for a in plan.copy_tables(0, 0, source_rank=2))
    num_slots = topo.G * topo.slots_per_rank
    ids = torch.tensor([[0, 5], [0, 1], [5, 0], [0, 5], [0, 7], [0, 5]])
    slot, counts = check_all(ids, copy_slot, quota, num_slots, device=device)
    # slots: expert e's home is (e // 2) * 3 + e % 2 (5 -> 7, 7 -> 10); rank 1's replica slot is 5, rank 3's 11
    assert slot[:, 0].tolist() == [5, 5, 11, 5, 0, 0]
    assert slot[:, 1].tolist() == [11, 1, 5, 7, 10, 7]


def test_auto_on_cpu_is_torch(interp):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"


# ---------------------------------------------------------------- bad input: clear errors, no launch

GOOD = dict(ids=torch.tensor([[0, 1], [1, -1]]), copy_slot=torch.tensor([[0, 2], [1, -1]]),
            quota=torch.tensor([[0, 1], [0, 0]]), num_slots=3)


def call(**over):
    a = {**GOOD, **over}
    return assign_slots(a["ids"], a["copy_slot"], a["quota"], a["num_slots"], backend=a.get("backend", "torch"))


@pytest.mark.parametrize("over, match", [
    (dict(ids=torch.tensor([[0, 2], [1, 0]])), "topk_ids must hold expert ids in \\[0, 2\\)"),
    (dict(ids=torch.tensor([[0, -2], [1, 0]])), "topk_ids"),
    (dict(ids=torch.tensor([[0.0, 1.0], [1.0, 0.0]])), "topk_ids must have an integer dtype"),
    (dict(ids=torch.tensor([[0, 1], [1, 0]]).t()), "topk_ids must be contiguous"),
    (dict(ids=torch.tensor([0, 1])), "topk_ids must be 2-D"),
    (dict(quota=torch.tensor([[0, 1, 0], [0, 0, 0]])), "quota has shape \\(2, 3\\) but copy_slot has \\(2, 2\\)"),
    (dict(quota=torch.tensor([[0, -1], [0, 0]])), "quota must be >= 0"),
    (dict(quota=torch.tensor([[0, 1], [0, 1]])), "copy_slot must be in \\[0, num_slots=3\\)"),
    (dict(copy_slot=torch.tensor([[0, 2], [-1, -1]])), "copy_slot must be in \\[0, num_slots=3\\)"),
    (dict(copy_slot=torch.tensor([[0, 3], [1, -1]])), "copy_slot"),
    (dict(copy_slot=torch.tensor([[0, 2], [1, -1]], dtype=torch.float32)), "copy_slot must have an integer"),
    (dict(num_slots=0), "num_slots must be a positive int"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        call(**over)


def test_bad_input_caught_before_triton(interp, monkeypatch):
    """Value errors come from the checks, not from a kernel (the kernels are never reached)."""
    import relibra_verl.kernels.slot_assign as sa

    monkeypatch.setattr(sa, "_assign_slots_triton", lambda *a: pytest.fail("kernel launched"))
    with pytest.raises(ValueError, match="topk_ids"):
        call(ids=torch.tensor([[0, 5], [1, 0]]), backend="triton")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        call(backend="triton")
