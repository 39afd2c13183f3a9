"""Slot assignment: each routed (token, k) pair -> the physical slot of the expert copy its quota gives it.

Rule (../shared/design.md, "Terms"): the i-th routed pair of this rank for expert e, in row-major order
over [T, K], goes to copy c of e when sum(q[e, :c]) <= i < sum(q[e, :c+1]); i >= sum(q[e, :]) goes to
copy 0 (home). A wrong plan only costs balance, never a token.

Layout (P = T*K pairs, flat index p = t*K + k; E experts; C copies per expert; NB bins = E here):
  topk_ids        [T, K]  any int dtype, -1 = masked pair
  copy_slot       [E, C]  physical slot of copy c of e (-1 absent), column 0 = home
  quota           [E, C]  this source rank's pairs for copy c
  slot_of_pair    [T, K]  int64, -1 for masked pairs
  slot_counts     [num_slots] int64

Triton path, all integer (deterministic whatever the scheduling):
  1. `_block_histogram_kernel`: pairs in blocks of BLOCK; counts [NB, NBLK] (key-major) of each key per block
  2. one torch.cumsum: along blocks per key (slot assignment: rank among the key's pairs) or over the
     flattened key-major table (permute: incl - counts is then directly the pair's row in the slot-sorted
     buffer, slot start included)
  3. `_rank_kernel`: that offset + the rank inside the block (a BLOCK x BLOCK comparison); MODE 0 turns
     the rank into copy and slot, MODE 1 (token_permute.py) stores it as the row index
  4. `_slot_counts_kernel`: per (e, c) the pairs it gets, from e's total and the quota ranges.
"""
import torch

from ._utils import (
    TritonKernel,
    check_int,
    check_tensor,
    int_range,
    next_pow2,
    raise_failed,
    resolve_backend,
    tl,
)

RANK_BLOCK = 128  # pairs per program: the in-block rank is a RANK_BLOCK^2 comparison


# ---------------------------------------------------------------- kernels

def _block_histogram_kernel(keys_ptr, counts_ptr, n, NB, NBLK,
                            BLOCK: tl.constexpr, NB_POW2: tl.constexpr):
    """counts[b, pid] = pairs of block pid whose key is b (keys outside [0, NB) are ignored)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    key = tl.load(keys_ptr + offs, mask=inb, other=-1).to(tl.int32)
    valid = inb & (key >= 0) & (key < NB)
    # masked pairs go to bin NB, which exists (NB_POW2 > NB) and is never stored: no histogram mask
    # needed, and no out-of-range input on the GPU path
    key = tl.where(valid, key, NB)
    hist = tl.histogram(key, NB_POW2)
    b = tl.arange(0, NB_POW2)
    tl.store(counts_ptr + b.to(tl.int64) * NBLK + pid, hist, mask=b < NB)


def _rank_kernel(keys_ptr, counts_ptr, incl_ptr, out_ptr, n, NB, NBLK, cq_ptr, copy_slot_ptr, C,
                 MODE: tl.constexpr, BLOCK: tl.constexpr, C_POW2: tl.constexpr):
    """Offset of each pair from the scanned counts + its rank among earlier same-key pairs of its block.

    MODE 0 (slot assignment): incl scanned per key, so the offset is the pair's rank among all pairs of
        its expert; out = copy_slot[e, copy] with copy from the cumulative quotas cq [E, C] (inclusive
        cumsum of quota); -1 for masked pairs.
    MODE 1 (row index): incl scanned over the flat key-major table, so the offset is the pair's row in
        the slot-sorted buffer; out = that row, -1 for masked pairs.
    """
    pid = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    offs = pid * BLOCK + i
    inb = offs < n
    key = tl.load(keys_ptr + offs, mask=inb, other=-1).to(tl.int32)
    valid = inb & (key >= 0) & (key < NB)
    key = tl.where(valid, key, -1)
    # earlier pairs of this block with the same key (masked pairs only match each other: unused)
    same = (key[:, None] == key[None, :]) & (i[None, :] < i[:, None])
    in_block = tl.reduce(same.to(tl.int32), 1, tl.standard._sum_combine)
    kc = tl.where(valid, key, 0)
    at = kc.to(tl.int64) * NBLK + pid
    base = tl.load(incl_ptr + at, mask=valid, other=0) - tl.load(counts_ptr + at, mask=valid, other=0)
    rank = (base + in_block).to(tl.int64)
    if MODE == 0:
        c = tl.arange(0, C_POW2)
        cmask = valid[:, None] & (c[None, :] < C)
        ke = kc.to(tl.int64) * C
        hi = tl.load(cq_ptr + ke[:, None] + c[None, :], mask=cmask, other=0)
        # copy = first c whose cumulative range ends after the rank; none -> home
        copy = tl.reduce(((hi <= rank[:, None]) & cmask).to(tl.int32), 1, tl.standard._sum_combine)
        copy = tl.where(copy >= C, 0, copy)
        slot = tl.load(copy_slot_ptr + ke + copy, mask=valid, other=-1).to(tl.int64)
        out = tl.where(valid, slot, -1)
    else:
        out = tl.where(valid, rank, -1)
    tl.store(out_ptr + offs, out, mask=inb)


def _slot_counts_kernel(incl_ptr, NBLK, quota_ptr, cq_ptr, copy_slot_ptr, slot_counts_ptr, E, C, num_slots,
                        BLOCK_E: tl.constexpr, C_POW2: tl.constexpr):
    """slot_counts[copy_slot[e, c]] += pairs of e that copy c gets (integer atomics: order-free).

    e's total is the last column of incl [E, NBLK] (counts scanned along blocks)."""
    pid = tl.program_id(0)
    e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    c = tl.arange(0, C_POW2)
    em = e < E
    m = em[:, None] & (c[None, :] < C)
    idx = e.to(tl.int64)[:, None] * C + c[None, :]
    total = tl.load(incl_ptr + e.to(tl.int64) * NBLK + (NBLK - 1), mask=em, other=0).to(tl.int64)
    q = tl.load(quota_ptr + idx, mask=m, other=0).to(tl.int64)
    hi = tl.load(cq_ptr + idx, mask=m, other=0)
    got = tl.minimum(tl.maximum(total[:, None] - (hi - q), 0), q)
    q_all = tl.load(cq_ptr + e.to(tl.int64) * C + (C - 1), mask=em, other=0)
    overflow = tl.maximum(total - q_all, 0)  # beyond every quota: home
    got = got + tl.where(c[None, :] == 0, overflow[:, None], 0)
    slot = tl.load(copy_slot_ptr + idx, mask=m, other=0).to(tl.int64)
    # the range test keeps unchecked (validate=False) bad tables from writing outside slot_counts
    tl.atomic_add(slot_counts_ptr + slot, got, mask=m & (got > 0) & (slot >= 0) & (slot < num_slots))


_block_histogram = TritonKernel(_block_histogram_kernel)
_rank = TritonKernel(_rank_kernel)
_slot_counts = TritonKernel(_slot_counts_kernel)


# ---------------------------------------------------------------- launchers

RANK_WARPS = 8  # the BLOCK x BLOCK comparison tile


def block_ranks(keys: torch.Tensor, num_bins: int, flat: bool):
    """Histogram and scan of flat integer keys [P] (see the module docstring).

    Returns (counts [NB, NBLK] int32, incl [NB, NBLK] int32): inclusive cumsum along blocks per key
    (flat=False) or over the whole key-major table (flat=True).
    """
    P = keys.numel()
    nblk = triton_cdiv(P, RANK_BLOCK)
    counts = torch.empty((num_bins, nblk), dtype=torch.int32, device=keys.device)
    _block_histogram.on(keys.device)[(nblk,)](
        keys, counts, P, num_bins, nblk, BLOCK=RANK_BLOCK, NB_POW2=next_pow2(num_bins + 1))
    if flat:
        incl = torch.cumsum(counts.view(-1), dim=0, dtype=torch.int32).view(num_bins, nblk)
    else:
        incl = torch.cumsum(counts, dim=1, dtype=torch.int32)
    return counts, incl


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _assign_slots_triton(topk_ids, copy_slot, quota, num_slots):
    T, K = topk_ids.shape
    E, C = copy_slot.shape
    dev = topk_ids.device
    slot_of_pair = torch.empty((T, K), dtype=torch.int64, device=dev)
    slot_counts = torch.zeros(num_slots, dtype=torch.int64, device=dev)
    P = T * K
    if P == 0:
        return slot_of_pair, slot_counts
    cq = torch.cumsum(quota, dim=1, dtype=torch.int64)
    counts, incl = block_ranks(topk_ids, E, flat=False)
    nblk = counts.shape[1]
    c_pow2 = next_pow2(C)
    _rank.on(dev)[(nblk,)](
        topk_ids, counts, incl, slot_of_pair, P, E, nblk, cq, copy_slot, C,
        MODE=0, BLOCK=RANK_BLOCK, C_POW2=c_pow2, num_warps=RANK_WARPS)
    block_e = min(64, next_pow2(E))
    _slot_counts.on(dev)[(triton_cdiv(E, block_e),)](
        incl, nblk, quota, cq, copy_slot, slot_counts, E, C, num_slots, BLOCK_E=block_e, C_POW2=c_pow2)
    return slot_of_pair, slot_counts


# ---------------------------------------------------------------- reference (tests and fallback)

def assign_slots_reference(topk_ids: torch.Tensor, copy_slot: torch.Tensor, quota: torch.Tensor,
                           num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch slot assignment (same contract as `assign_slots`, no argument checks).

    topk_ids [T, K], copy_slot [E, C], quota [E, C] -> (slot_of_pair [T, K] int64, slot_counts
    [num_slots] int64).
    """
    T, K = topk_ids.shape
    E, C = copy_slot.shape
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    valid = ids >= 0
    key = torch.where(valid, ids, E)  # masked pairs sort last
    # rank among earlier pairs with the same expert: position in the stable sort minus the group start
    order = torch.argsort(key, stable=True)
    per_key = torch.bincount(key, minlength=E + 1)
    start = torch.cumsum(per_key, 0) - per_key
    rank = torch.empty_like(ids)
    rank[order] = torch.arange(ids.numel(), device=dev) - start[key[order]]
    e = ids.clamp(min=0)
    hi = torch.cumsum(quota.to(torch.int64), dim=1)[e]  # [P, C]
    copy = (hi <= rank[:, None]).sum(1)
    copy = torch.where(copy >= C, 0, copy)
    slot = torch.where(valid, copy_slot.to(torch.int64)[e, copy], -1)
    slot_counts = torch.bincount(slot[valid], minlength=num_slots)[:num_slots]
    return slot.view(T, K), slot_counts


# ---------------------------------------------------------------- public

def _check_assign_args(topk_ids, copy_slot, quota, num_slots, values=True):
    check_tensor("topk_ids", topk_ids, ndim=2, kind="int")
    dev = topk_ids.device
    check_tensor("copy_slot", copy_slot, ndim=2, kind="int", device=dev)
    check_tensor("quota", quota, ndim=2, kind="int", device=dev)
    check_int("num_slots", num_slots, low=1)
    if quota.shape != copy_slot.shape:
        raise ValueError(f"quota has shape {tuple(quota.shape)} but copy_slot has {tuple(copy_slot.shape)}: "
                         "both must be [E, C]")
    E, C = copy_slot.shape
    if E < 1 or C < 1:
        raise ValueError(f"copy_slot must be [E, C] with E >= 1 and C >= 1 (column 0 = home), got {(E, C)}")
    if not values:
        return
    # values: one host sync for all of them
    q = quota.to(torch.int64)
    cs = copy_slot.to(torch.int64)
    used = (q > 0) | (torch.arange(C, device=dev) == 0)  # home always, replicas when they get pairs
    raise_failed([
        (f"topk_ids must hold expert ids in [0, {E}) or -1 for masked pairs", int_range(topk_ids, -1, E)),
        ("quota must be >= 0", (q >= 0).all()),
        (f"copy_slot must be in [0, num_slots={num_slots}) for every home copy (column 0) and every copy "
         "with a positive quota", ((cs >= 0) & (cs < num_slots) | ~used).all()),
        (f"copy_slot must be -1 or in [0, num_slots={num_slots})", int_range(copy_slot, -1, num_slots)),
    ])


def assign_slots(topk_ids: torch.Tensor, copy_slot: torch.Tensor, quota: torch.Tensor, num_slots: int,
                 backend: str = "auto", validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Physical slot of every routed (token, k) pair, from this source rank's quota tables.

    topk_ids:  [T, K] logical expert ids (any int dtype), -1 for masked pairs.
    copy_slot: [E, C] physical slot of copy c of expert e (-1 absent; column 0 = home).
    quota:     [E, C] pairs of this rank for copy c, in row-major pair order; the rest go home.
    num_slots: size of the physical slot space (G * (S + R)).
    backend:   "auto" | "triton" | "torch" (see kernels/_utils.py).
    validate:  check values too (one host sync); shapes, dtypes and layout are always checked.
    Returns (slot_of_pair [T, K] int64, -1 masked; slot_counts [num_slots] int64).
    """
    _check_assign_args(topk_ids, copy_slot, quota, num_slots, values=validate)
    if resolve_backend(backend, topk_ids.device) == "torch":
        return assign_slots_reference(topk_ids, copy_slot, quota, num_slots)
    return _assign_slots_triton(topk_ids, copy_slot, quota, num_slots)


__all__ = ["assign_slots", "assign_slots_reference"]
