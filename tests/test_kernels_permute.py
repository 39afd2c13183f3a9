"""permute / unpermute: Triton (interpreter on CPU) against the plain-torch references, gradients included."""
import pytest
import torch

from relibra_verl.kernels import (
    assign_slots_reference,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)
from relibra_verl.kernels.token_permute import COPY_BLOCK_H

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=5e-3),  # sums of <= 8 terms
       torch.bfloat16: dict(atol=8e-2, rtol=2e-2)}
# CPU runs the interpreter (fp32/fp16: it computes bf16 wrongly); on a GPU machine the cases also run compiled
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_DTYPES = [(d, t) for d in DEVICES
                 for t in (torch.float32, torch.float16) + ((torch.bfloat16,) if d == "cuda" else ())]


def make(T, K, H, E, num_slots, mask, dtype, seed, probs_dtype=None, device="cpu"):
    """Random routing -> (hidden [T, H], probs [T, K], slot_of_pair [T, K], slot_counts), leaves needing grad."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=gen)
    ids[torch.rand(T, K, generator=gen) < mask] = -1
    copy_slot = torch.full((E, 2), -1, dtype=torch.int64)
    copy_slot[:, 0] = torch.randint(0, num_slots, (E,), generator=gen)
    copy_slot[: E // 2, 1] = torch.randint(0, num_slots, (E // 2,), generator=gen)
    quota = torch.where(copy_slot >= 0, torch.randint(0, 4, (E, 2), generator=gen), 0)
    quota[:, 0] = 0
    slot, counts = assign_slots_reference(ids, copy_slot, quota, num_slots)
    hidden = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    probs = torch.rand(T, K, generator=gen).to(device=device, dtype=probs_dtype or dtype).requires_grad_()
    return hidden, probs, slot.to(device), counts.to(device)


def check_order(row_index, slot):
    """Rows sorted by slot, inside a slot by (t, k); row_index a bijection onto [0, N)."""
    T, K = slot.shape
    valid = slot >= 0
    n = int(valid.sum())
    ri = row_index[valid]
    assert sorted(ri.tolist()) == list(range(n))
    pairs = sorted((int(slot[t, k]), t, k) for t in range(T) for k in range(K) if slot[t, k] >= 0)
    assert [int(row_index[t, k]) for _, t, k in pairs] == list(range(n))
    assert (row_index[~valid] == -1).all()


CASES = [  # T, K, H, E, num_slots, mask
    (0, 8, 16, 4, 6, 0.0),
    (1, 1, 1, 1, 1, 0.0),
    (7, 1, 24, 3, 5, 0.3),
    (19, 8, 32, 8, 12, 0.1),
    (20, 2, 17, 5, 40, 0.0),  # most slots empty, H not a power of two
    (6, 6, 8, 3, 4, 0.5),  # K not a power of two
    (3, 2, COPY_BLOCK_H + 76, 2, 3, 0.0),  # several hidden blocks
    (40, 8, 4, 16, 24, 0.0),  # 320 pairs: three rank blocks
    (50, 8, 8, 40, 300, 0.1),  # more slots than a rank block has pairs
    (4, 0, 8, 2, 3, 0.0),  # K = 0: nothing routed
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device, dtype", DEVICE_DTYPES)
def test_forward_backward_match_reference(interp, case, device, dtype):
    T, K, H, E, ns, mask = case
    hidden, probs, slot, counts = make(T, K, H, E, ns, mask, dtype, seed=T * 31 + K, device=device)
    tol = TOL[dtype]

    perm_t, pp_t, ri_t = permute(hidden, probs, slot, counts, backend="triton")
    perm_r, pp_r, ri_r = permute_reference(hidden, probs, slot, counts)
    assert ri_t.dtype == torch.int64 and torch.equal(ri_t, ri_r)
    check_order(ri_t.cpu(), slot.cpu())
    assert perm_t.dtype == dtype and pp_t.dtype == probs.dtype
    assert torch.equal(perm_t, perm_r) and torch.equal(pp_t, pp_r)  # pure data movement: exact

    gen = torch.Generator().manual_seed(7)
    expert_out = torch.randn(perm_t.shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    out_t = unpermute(expert_out, probs, ri_t, T, backend="triton")
    out_r = unpermute_reference(expert_out, probs, ri_r, T)
    assert out_t.dtype == dtype and out_t.shape == (T, H)
    torch.testing.assert_close(out_t, out_r, **tol)

    # gradients: one loss through permute and unpermute, and through permuted_probs directly
    g_out = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    g_perm = torch.randn(perm_t.shape, generator=gen).to(device=device, dtype=dtype)
    g_pp = torch.randn(pp_t.shape, generator=gen).to(device=device, dtype=probs.dtype)

    def grads(perm, pp, out):
        loss = (perm.float() * g_perm.float()).sum() + (pp.float() * g_pp.float()).sum() \
            + (out.float() * g_out.float()).sum()
        leaves = [hidden, probs, expert_out]
        got = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves)]  # T = 0: unused

    for gt, gr, name in zip(grads(perm_t, pp_t, out_t), grads(perm_r, pp_r, out_r), "hidden probs expert_out".split()):
        assert gt.dtype == gr.dtype, name
        torch.testing.assert_close(gt, gr, **tol, msg=lambda m: f"grad {name}: {m}")


def test_all_pairs_masked(interp, device):
    hidden, probs, slot, counts = make(5, 4, 8, 3, 4, 1.0, torch.float32, seed=1, device=device)
    assert (slot == -1).all()
    perm, pp, ri = permute(hidden, probs, slot, counts, backend="triton")
    assert perm.shape == (0, 8) and pp.shape == (0,) and (ri == -1).all()
    out = unpermute(perm, probs, ri, 5, backend="triton")
    assert torch.equal(out.cpu(), torch.zeros(5, 8))
    gh, gp = torch.autograd.grad(out.sum() + perm.sum() + pp.sum(), [hidden, probs])
    assert not gh.any() and not gp.any()


def test_one_slot_takes_everything(interp, device):
    T, K, H = 30, 8, 8
    hidden = torch.randn(T, H, device=device, requires_grad=True)
    probs = torch.rand(T, K, device=device, requires_grad=True)
    slot = torch.full((T, K), 3, dtype=torch.int64, device=device)
    counts = torch.tensor([0, 0, 0, T * K, 0], device=device)
    perm, pp, ri = permute(hidden, probs, slot, counts, backend="triton")
    assert torch.equal(ri.view(-1).cpu(), torch.arange(T * K))
    assert torch.equal(perm, hidden.detach().repeat_interleave(K, 0))


def test_round_trip_with_unit_probs(interp, device):
    """unpermute(permute(h)) with probs 1 gives h times the number of unmasked pairs per token."""
    hidden, probs, slot, counts = make(23, 4, 16, 6, 9, 0.25, torch.float32, seed=3, device=device)
    perm, _, ri = permute(hidden, probs, slot, counts, backend="triton")
    ones = torch.ones_like(probs)
    out = unpermute(perm, ones, ri, 23, backend="triton")
    torch.testing.assert_close(out, hidden * (slot >= 0).sum(1, keepdim=True).float())


def test_fp32_probs_with_fp16_hidden(interp, device):
    """Megatron keeps router probs in fp32 while tokens are half precision."""
    hidden, probs, slot, counts = make(11, 4, 16, 4, 6, 0.1, torch.float16, seed=4, probs_dtype=torch.float32,
                                       device=device)
    perm, pp, ri = permute(hidden, probs, slot, counts, backend="triton")
    assert pp.dtype == torch.float32 and perm.dtype == torch.float16
    out_t = unpermute(perm, probs, ri, 11, backend="triton")
    torch.testing.assert_close(out_t, unpermute_reference(perm, probs, ri, 11), **TOL[torch.float16])


def test_deterministic_including_grads(interp, device):
    def run():
        hidden, probs, slot, counts = make(33, 8, 16, 8, 10, 0.1, torch.float32, seed=5, device=device)
        perm, pp, ri = permute(hidden, probs, slot, counts, backend="triton")
        out = unpermute(perm * 2, probs, ri, 33, backend="triton")
        return (perm, pp, ri, out) + torch.autograd.grad(out.square().sum() + pp.sum(), [hidden, probs])

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_num_out_and_no_validation(interp):
    hidden, probs, slot, counts = make(12, 2, 8, 4, 5, 0.0, torch.float32, seed=6)
    a = permute(hidden, probs, slot, counts, backend="triton", validate=False, num_out=24)
    b = permute_reference(hidden, probs, slot, counts)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="num_out=23 but slot_of_pair has 24"):
        permute(hidden, probs, slot, counts, backend="triton", num_out=23)


def test_matches_megatron_unfused_permute(interp, device):
    """Same buffer, probs and combine as Megatron-Core's permute/unpermute on the slot-space routing map."""
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    from relibra_verl.kernels.benchmark import dense_routing, make_problem

    T = 45  # a valid plan: every slot holds one expert copy, so a token has at most one pair per slot
    p = make_problem(T, 8, 24, torch.float32, device, seed=8, E=16, G=4, R=1, mask=0.1)
    hidden, probs = p["hidden"], p["probs"]
    slot, counts = assign_slots_reference(p["ids"], p["copy_slot"], p["quota"], p["num_slots"])
    S, R = 4, 1
    assert counts[torch.arange(p["num_slots"], device=device) % (S + R) >= S].sum() > 0  # replicas are used
    perm, pp, ri = permute(hidden, probs, slot, counts, backend="triton")
    rmap, probs_dense = dense_routing(slot, probs, p["num_slots"])
    m_perm, m_pp, m_idx, _, _ = moe_utils.permute(hidden, rmap, probs=probs_dense, num_out_tokens=perm.shape[0])
    assert torch.equal(perm, m_perm) and torch.equal(pp, m_pp)
    eo = torch.randn_like(perm)
    theirs = moe_utils.unpermute(eo, m_idx, hidden.shape, probs=probs_dense, routing_map=rmap)
    torch.testing.assert_close(unpermute(eo, probs, ri, T, backend="triton"), theirs)


def test_auto_backend_on_cpu_uses_reference(interp, monkeypatch):
    import relibra_verl.kernels.token_permute as tp

    monkeypatch.setattr(tp, "row_index_triton", lambda *a: pytest.fail("Triton used on CPU by 'auto'"))
    hidden, probs, slot, counts = make(4, 2, 8, 2, 3, 0.0, torch.float32, seed=2)
    permute(hidden, probs, slot, counts)  # backend="auto"


# ---------------------------------------------------------------- bad input

def good():
    hidden = torch.randn(3, 4)
    probs = torch.rand(3, 2)
    slot = torch.tensor([[0, 1], [1, -1], [2, 0]])
    counts = torch.tensor([2, 2, 1])
    return dict(hidden=hidden, probs=probs, slot=slot, counts=counts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("over, match", [
    (dict(hidden=torch.randn(4, 3).t()), "hidden must be contiguous"),
    (dict(hidden=torch.randn(3, 4).to(torch.float64)), "hidden must be float32, float16 or bfloat16"),
    (dict(hidden=torch.ones(3, 4, dtype=torch.int32)), "hidden must be"),
    (dict(probs=torch.rand(3, 3)), "must agree"),
    (dict(probs=torch.rand(2, 3).t()), "probs must be contiguous"),
    (dict(slot=torch.tensor([[0, 1], [1, -1], [3, 0]])), "slot_of_pair must hold slots in \\[0, 3\\)"),
    (dict(slot=torch.tensor([[0, 1], [1, -2], [2, 0]])), "slot_of_pair must hold"),
    (dict(slot=torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])), "slot_of_pair must have an integer dtype"),
    (dict(counts=torch.tensor([2, 1, 1])), "slot_counts does not match slot_of_pair"),
    (dict(counts=torch.tensor([[2, 2, 1]])), "slot_counts must be 1-D"),
])
def test_permute_bad_input(interp, backend, over, match):
    a = {**good(), **over}
    with pytest.raises(ValueError, match=match):
        permute(a["hidden"], a["probs"], a["slot"], a["counts"], backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("over, match", [
    (dict(ri=torch.tensor([[0, 1], [2, -1], [5, 3]])), "row_index must hold rows in \\[0, 5\\)"),
    (dict(ri=torch.tensor([[0, 1], [2, -1]])), "must both be \\[T=3, K\\]"),
    (dict(eo=torch.randn(4, 5).t()), "expert_out must be contiguous"),
    (dict(eo=torch.randn(5, 4, dtype=torch.float64)), "expert_out must be float32"),
    (dict(T=-1), "T must be a non-negative int"),
])
def test_unpermute_bad_input(interp, backend, over, match):
    a = dict(eo=torch.randn(5, 4), probs=torch.rand(3, 2), ri=torch.tensor([[0, 1], [2, -1], [4, 3]]), T=3)
    a.update(over)
    with pytest.raises(ValueError, match=match):
        unpermute(a["eo"], a["probs"], a["ri"], a["T"], backend=backend)


def test_errors_before_any_launch(interp, monkeypatch):
    import relibra_verl.kernels.token_permute as tp

    monkeypatch.setattr(tp, "row_index_triton", lambda *a: pytest.fail("kernel launched"))
    monkeypatch.setattr(tp, "gather_sum_triton", lambda *a: pytest.fail("kernel launched"))
    a = good()
    with pytest.raises(ValueError, match="slot_of_pair must hold"):
        permute(a["hidden"], a["probs"], torch.tensor([[0, 1], [1, -1], [9, 0]]), a["counts"], backend="triton")
    with pytest.raises(ValueError, match="row_index"):
        unpermute(torch.randn(5, 4), a["probs"], torch.tensor([[0, 1], [2, -1], [7, 3]]), 3, backend="triton")
