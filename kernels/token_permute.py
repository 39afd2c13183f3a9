"""Permute (tokens -> slot-sorted send buffer) and unpermute (weighted combine back), differentiable.

Layout (T tokens, K top-k, H hidden, N unmasked pairs, num_slots physical slots):
  hidden          [T, H]  fp32 | fp16 | bf16
  probs           [T, K]  routing probabilities (any float dtype of the three)
  slot_of_pair    [T, K]  int, -1 masked (from `assign_slots`)
  slot_counts     [num_slots] int (from `assign_slots`; must match slot_of_pair)
  permuted        [N, H]  rows sorted by slot, inside a slot by (t, k)
  permuted_probs  [N]
  row_index       [T, K]  int64 row of each pair in `permuted`, -1 masked
  unpermute out   [T, H]  sum_k probs[t, k] * expert_out[row_index[t, k]] (fp32 accumulation)

Kernels: the row index reuses slot_assign's block histogram + rank kernel (MODE 1, key = slot, one
flat scan gives slot start + block offset);
`_permute_kernel` reads each token row once and writes it to its K rows (minimal traffic, disjoint
destinations); `_gather_sum_kernel` does unpermute and permute's backward (a fixed-order sum over k,
so deterministic, no float atomics); `_unpermute_bwd_kernel` writes expert_out's gradient (disjoint
rows) and the probs' gradient (a per-pair dot product over H inside one program).
"""
import torch

from ._utils import TritonKernel, check_int, check_tensor, int_range, next_pow2, raise_failed, resolve_backend, tl
from .slot_assign import RANK_BLOCK, RANK_WARPS, _rank, block_ranks, triton_cdiv

COPY_BLOCK_H = 1024  # hidden elements per program in the row kernels


# ---------------------------------------------------------------- kernels

def _permute_kernel(hidden_ptr, probs_ptr, row_index_ptr, out_ptr, out_probs_ptr, H, N,
                    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (T, cdiv(H, BLOCK_H)): out[row_index[t, k], h] = hidden[t, h]; out_probs likewise."""
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    k = tl.arange(0, K_POW2)
    km = k < K
    dst = tl.load(row_index_ptr + t * K + k, mask=km, other=-1)
    ok = km & (dst >= 0) & (dst < N)  # rows outside the buffer (a wrong unchecked num_out) are never written
    x = tl.load(hidden_ptr + t * H + h, mask=hm)
    xs = tl.broadcast_to(x[None, :], (K_POW2, BLOCK_H))
    tl.store(out_ptr + dst[:, None] * H + h[None, :], xs, mask=ok[:, None] & hm[None, :])
    p = tl.load(probs_ptr + t * K + k, mask=km, other=0.0)
    tl.store(out_probs_ptr + dst, p, mask=ok & (hb == 0))


def _gather_sum_kernel(src_ptr, probs_ptr, row_index_ptr, out_ptr, H, N,
                       K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_H: tl.constexpr, HAS_PROBS: tl.constexpr):
    """Grid (T, cdiv(H, BLOCK_H)): out[t, h] = sum_k w[t, k] * src[row_index[t, k], h] in fp32.

    w = probs (unpermute) or 1 (permute's backward); masked pairs add nothing.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    k = tl.arange(0, K_POW2)
    km = k < K
    src_row = tl.load(row_index_ptr + t * K + k, mask=km, other=-1)
    ok = km & (src_row >= 0) & (src_row < N)
    rows = tl.load(src_ptr + src_row[:, None] * H + h[None, :], mask=ok[:, None] & hm[None, :], other=0.0)
    rows = rows.to(tl.float32)  # also keeps fp16/bf16 arithmetic out of the interpreter
    if HAS_PROBS:
        w = tl.load(probs_ptr + t * K + k, mask=ok, other=0.0).to(tl.float32)
        rows = rows * w[:, None]
    acc = tl.reduce(rows, 0, tl.standard._sum_combine)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=hm)


def _unpermute_bwd_kernel(grad_out_ptr, expert_out_ptr, probs_ptr, row_index_ptr, grad_eo_ptr, grad_probs_ptr,
                          H, N, K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_H: tl.constexpr,
                          NEED_EO: tl.constexpr, NEED_PROBS: tl.constexpr):
    """Grid (T,): grad_eo[row_index[t, k]] = probs[t, k] * grad_out[t];
    grad_probs[t, k] = <grad_out[t], expert_out[row_index[t, k]]> (fp32, whole H in this program)."""
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, K_POW2)
    km = k < K
    row = tl.load(row_index_ptr + t * K + k, mask=km, other=-1)
    ok = km & (row >= 0) & (row < N)
    p = tl.load(probs_ptr + t * K + k, mask=ok, other=0.0).to(tl.float32)
    dot = tl.full((K_POW2,), 0.0, tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < H
        m2 = ok[:, None] & hm[None, :]
        g = tl.load(grad_out_ptr + t * H + h, mask=hm, other=0.0).to(tl.float32)
        if NEED_EO:
            ge = p[:, None] * g[None, :]
            tl.store(grad_eo_ptr + row[:, None] * H + h[None, :], ge.to(grad_eo_ptr.dtype.element_ty), mask=m2)
        if NEED_PROBS:
            x = tl.load(expert_out_ptr + row[:, None] * H + h[None, :], mask=m2, other=0.0).to(tl.float32)
            dot += tl.reduce(x * g[None, :], 1, tl.standard._sum_combine)
    if NEED_PROBS:
        tl.store(grad_probs_ptr + t * K + k, dot.to(grad_probs_ptr.dtype.element_ty), mask=km)


_permute_k = TritonKernel(_permute_kernel)
_gather_sum_k = TritonKernel(_gather_sum_kernel)
_unpermute_bwd_k = TritonKernel(_unpermute_bwd_kernel)


# ---------------------------------------------------------------- launchers

def _block_h(H: int) -> int:
    return min(next_pow2(H), COPY_BLOCK_H)


def _num_warps(block_h: int, k_pow2: int) -> int:
    # 4 warps: the [K, BLOCK_H] tiles then keep 16-byte accesses with no shared-memory layout change
    # (8 warps added a shared-memory round trip and 8-byte stores in sm_90 PTX)
    return 4


def row_index_triton(slot_of_pair: torch.Tensor, num_slots: int):
    """[T, K] slots -> (row_index [T, K] int64, counts [num_slots, NBLK] int32, n 0-d: unmasked pairs)."""
    T, K = slot_of_pair.shape
    dev = slot_of_pair.device
    row_index = torch.empty((T, K), dtype=torch.int64, device=dev)
    if T * K == 0:
        return (row_index, torch.zeros((num_slots, 1), dtype=torch.int32, device=dev),
                torch.zeros((), dtype=torch.int32, device=dev))
    counts, incl = block_ranks(slot_of_pair, num_slots, flat=True)
    nblk = counts.shape[1]
    _rank.on(dev)[(nblk,)](
        slot_of_pair, counts, incl, row_index, T * K, num_slots, nblk, counts, counts, 1,
        MODE=1, BLOCK=RANK_BLOCK, C_POW2=1, num_warps=RANK_WARPS)
    return row_index, counts, incl.view(-1)[-1]


def permute_rows_triton(hidden, probs, row_index, num_out: int):
    """hidden [T, H], probs [T, K], row_index [T, K] -> (permuted [num_out, H], permuted_probs [num_out])."""
    T, H = hidden.shape
    K = row_index.shape[1]
    out = torch.empty((num_out, H), dtype=hidden.dtype, device=hidden.device)
    out_probs = torch.empty((num_out,), dtype=probs.dtype, device=hidden.device)
    if T == 0 or num_out == 0:
        return out, out_probs
    bh, kp = _block_h(H), next_pow2(K)
    # at least one program per token even when H == 0: the probs still move
    _permute_k.on(hidden.device)[(T, max(1, triton_cdiv(H, bh)))](
        hidden, probs, row_index, out, out_probs, H, num_out, K=K, K_POW2=kp, BLOCK_H=bh, num_warps=_num_warps(bh, kp))
    return out, out_probs


def gather_sum_triton(src, probs, row_index, T: int, out_dtype):
    """src [N, H], probs [T, K] or None, row_index [T, K] -> [T, H] (see _gather_sum_kernel)."""
    H = src.shape[1]
    K = row_index.shape[1]
    out = torch.empty((T, H), dtype=out_dtype, device=src.device)
    if T == 0 or H == 0:
        return out
    bh, kp = _block_h(H), next_pow2(K)
    _gather_sum_k.on(src.device)[(T, triton_cdiv(H, bh))](
        src, probs if probs is not None else row_index, row_index, out, H, src.shape[0],
        K=K, K_POW2=kp, BLOCK_H=bh, HAS_PROBS=probs is not None, num_warps=_num_warps(bh, kp))
    return out


def unpermute_bwd_triton(grad_out, expert_out, probs, row_index, need_eo: bool, need_probs: bool):
    """-> (grad_expert_out [N, H] or None, grad_probs [T, K] or None)."""
    T, H = grad_out.shape
    K = row_index.shape[1]
    dev = grad_out.device
    # rows no pair points at get no gradient: start from zeros
    grad_eo = torch.zeros_like(expert_out) if need_eo else None
    grad_probs = torch.zeros_like(probs) if need_probs else None
    if T == 0 or H == 0:
        return grad_eo, grad_probs
    bh, kp = _block_h(H), next_pow2(K)
    _unpermute_bwd_k.on(dev)[(T,)](
        grad_out, expert_out, probs, row_index,
        grad_eo if need_eo else grad_out, grad_probs if need_probs else probs,
        H, expert_out.shape[0], K=K, K_POW2=kp, BLOCK_H=bh, NEED_EO=need_eo, NEED_PROBS=need_probs,
        num_warps=_num_warps(bh, kp))
    return grad_eo, grad_probs


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, probs, row_index, num_out):
        permuted, permuted_probs = permute_rows_triton(hidden, probs, row_index, num_out)
        ctx.save_for_backward(row_index)
        ctx.hidden_dtype = hidden.dtype
        return permuted, permuted_probs

    @staticmethod
    def backward(ctx, grad_permuted, grad_permuted_probs):
        (row_index,) = ctx.saved_tensors
        T = row_index.shape[0]
        grad_hidden = grad_probs = None
        if ctx.needs_input_grad[0]:
            grad_hidden = gather_sum_triton(grad_permuted.contiguous(), None, row_index, T, ctx.hidden_dtype)
        if ctx.needs_input_grad[1]:
            g = grad_permuted_probs
            if g.numel() == 0:
                grad_probs = torch.zeros(row_index.shape, dtype=g.dtype, device=g.device)
            else:
                grad_probs = torch.where(row_index >= 0, g[row_index.clamp(min=0)], torch.zeros((), dtype=g.dtype,
                                                                                              device=g.device))
        return grad_hidden, grad_probs, None, None


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, probs, row_index, T):
        out = gather_sum_triton(expert_out, probs, row_index, T, expert_out.dtype)
        ctx.save_for_backward(expert_out, probs, row_index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, probs, row_index = ctx.saved_tensors
        grad_eo, grad_probs = unpermute_bwd_triton(grad_out.contiguous(), expert_out, probs, row_index,
                                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_eo, grad_probs, None, None


# ---------------------------------------------------------------- references (tests and fallback)

def permute_reference(hidden: torch.Tensor, probs: torch.Tensor, slot_of_pair, slot_counts, *,
                      row_index: torch.Tensor | None = None, num_out: int | None = None):
    """Plain-torch permute (same contract as `permute`, no checks; differentiable through indexing).

    hidden [T, H], probs [T, K], slot_of_pair [T, K] (or a precomputed row_index [T, K])
    -> (permuted [N, H], permuted_probs [N], row_index [T, K] int64).
    """
    T, H = hidden.shape
    K = probs.shape[1]
    dev = hidden.device
    if row_index is None:
        flat = slot_of_pair.reshape(-1).to(torch.int64)
        valid = flat >= 0
        n = int(valid.sum()) if num_out is None else num_out
        # stable sort by slot keeps (t, k) order inside a slot; masked pairs sort last
        order = torch.argsort(torch.where(valid, flat, torch.iinfo(torch.int64).max), stable=True)[:n]
        row_index = torch.full((T * K,), -1, dtype=torch.int64, device=dev)
        row_index[order] = torch.arange(n, device=dev)
        row_index = row_index.view(T, K)
    else:
        flat_ri = row_index.reshape(-1)
        n = int((flat_ri >= 0).sum()) if num_out is None else num_out
        order = torch.empty(n, dtype=torch.int64, device=dev)
        sel = flat_ri >= 0
        order[flat_ri[sel]] = torch.arange(T * K, device=dev)[sel]
    permuted = hidden[order // K] if K else hidden[:0]
    permuted_probs = probs.reshape(-1)[order]
    return permuted, permuted_probs, row_index


def unpermute_reference(expert_out: torch.Tensor, probs: torch.Tensor, row_index: torch.Tensor,
                        T: int) -> torch.Tensor:
    """Plain-torch combine: out [T, H] = sum_k probs[t, k] * expert_out[row_index[t, k]] (fp32 sums,
    output in expert_out's dtype; masked pairs add nothing). Differentiable in expert_out and probs."""
    N, H = expert_out.shape
    K = row_index.shape[1]
    valid = row_index >= 0
    rows = expert_out[row_index.clamp(min=0).reshape(-1)].view(T, K, H).float() if N else \
        expert_out.new_zeros((T, K, H), dtype=torch.float32)
    w = torch.where(valid, probs.float(), torch.zeros((), device=probs.device))
    return (w.unsqueeze(-1) * rows).sum(1).to(expert_out.dtype)


# ---------------------------------------------------------------- public

def permute(hidden: torch.Tensor, probs: torch.Tensor, slot_of_pair: torch.Tensor, slot_counts: torch.Tensor,
            backend: str = "auto", validate: bool = True, num_out: int | None = None):
    """Gather routed token rows into the slot-sorted send buffer.

    hidden:       [T, H] fp32 | fp16 | bf16 (differentiable)
    probs:        [T, K] routing probabilities (carried along; differentiable)
    slot_of_pair: [T, K] int, -1 masked; slot_counts: [num_slots] int (both from `assign_slots`)
    backend:      "auto" | "triton" | "torch"
    validate:     check values (slot range, slot_counts matching slot_of_pair; host syncs)
    num_out:      N if the caller knows it (saves the host sync that sizes the buffer)
    Returns (permuted [N, H], permuted_probs [N], row_index [T, K] int64, -1 masked); rows are sorted by
    slot, inside a slot by (t, k).
    """
    check_tensor("hidden", hidden, ndim=2, kind="float")
    dev = hidden.device
    check_tensor("probs", probs, ndim=2, kind="float", device=dev)
    check_tensor("slot_of_pair", slot_of_pair, ndim=2, kind="int", device=dev)
    check_tensor("slot_counts", slot_counts, ndim=1, kind="int", device=dev)
    T = hidden.shape[0]
    if probs.shape[0] != T or slot_of_pair.shape != probs.shape:
        raise ValueError(f"hidden [T, H] = {tuple(hidden.shape)}, probs {tuple(probs.shape)} and slot_of_pair "
                         f"{tuple(slot_of_pair.shape)} must agree: probs and slot_of_pair are [T, K]")
    num_slots = slot_counts.shape[0]
    if num_slots < 1:
        raise ValueError("slot_counts must have at least one slot")
    if validate:
        raise_failed([
            (f"slot_of_pair must hold slots in [0, {num_slots}) (len(slot_counts)) or -1 for masked pairs",
             int_range(slot_of_pair, -1, num_slots)),
            ("slot_counts must be >= 0", int_range(slot_counts, 0, 2**62)),
        ])
    check_int("num_out", num_out, low=0, none_ok=True)
    if resolve_backend(backend, dev) == "torch":
        if validate:
            _check_counts(torch.bincount(slot_of_pair.reshape(-1).to(torch.int64).clamp(min=-1) + 1,
                                         minlength=num_slots + 1)[1:], slot_counts, num_out)
        return permute_reference(hidden, probs, slot_of_pair, slot_counts, num_out=num_out)
    row_index, counts, total = row_index_triton(slot_of_pair, num_slots)
    if validate:
        n = _check_counts(counts.sum(1), slot_counts, num_out)
    elif num_out is None:
        n = int(total)
    else:
        n = num_out
    permuted, permuted_probs = _PermuteFn.apply(hidden, probs, row_index, n)
    return permuted, permuted_probs, row_index


def _check_counts(totals, slot_counts, num_out):
    """totals [num_slots]: pairs per slot actually in slot_of_pair. One host sync; returns N."""
    n, bad = torch.stack([totals.sum().to(torch.int64),
                          (totals.to(torch.int64) != slot_counts.to(torch.int64)).sum()]).tolist()
    if bad:
        raise ValueError(f"slot_counts does not match slot_of_pair in {bad} slot(s): pass the counts "
                         "assign_slots returned with these slots")
    if num_out is not None and num_out != n:
        raise ValueError(f"num_out={num_out} but slot_of_pair has {n} unmasked pairs")
    return n


def unpermute(expert_out: torch.Tensor, probs: torch.Tensor, row_index: torch.Tensor, T: int,
              backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """Weighted combine of expert outputs back to token order.

    expert_out: [N, H] fp32 | fp16 | bf16, rows in permute's order (differentiable)
    probs:      [T, K] weights (differentiable); row_index: [T, K] int from `permute`, -1 masked
    T:          number of tokens (= probs.shape[0])
    Returns out [T, H] in expert_out's dtype: sum_k probs[t, k] * expert_out[row_index[t, k]], fp32 sums.
    """
    check_tensor("expert_out", expert_out, ndim=2, kind="float")
    dev = expert_out.device
    check_tensor("probs", probs, ndim=2, kind="float", device=dev)
    check_tensor("row_index", row_index, ndim=2, kind="int", device=dev)
    check_int("T", T, low=0)
    if probs.shape[0] != T or row_index.shape != probs.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and row_index {tuple(row_index.shape)} must both be "
                         f"[T={T}, K]")
    N = expert_out.shape[0]
    if validate:
        raise_failed([(f"row_index must hold rows in [0, {N}) (expert_out's rows) or -1 for masked pairs",
                       int_range(row_index, -1, N))])
    if resolve_backend(backend, dev) == "torch":
        return unpermute_reference(expert_out, probs, row_index, T)
    if row_index.dtype != torch.int64:
        row_index = row_index.to(torch.int64)
    return _UnpermuteFn.apply(expert_out, probs, row_index, T)


__all__ = ["permute", "unpermute", "permute_reference", "unpermute_reference"]
