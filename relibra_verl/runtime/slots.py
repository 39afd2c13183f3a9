"""Logical expert -> physical slot assignment for one source rank (the plain-torch reference).

Rule (../shared/design.md): the i-th routed (token, k) pair of this rank for expert e, in token order, goes
to the copy c of e whose cumulative quota range [sum q[e, :c], sum q[e, :c+1]) holds i; pairs beyond
sum_c q[e, c] go home (copy 0). So any routing is dispatched correctly; a wrong plan only costs balance.

Shapes: T tokens, E logical experts, C copies per expert (column 0 = home), P physical slots = G*(S+R).
"""
from __future__ import annotations

import torch


def assign_pairs(expert_T: torch.Tensor, rank_in_expert_T: torch.Tensor, copy_slot_EC: torch.Tensor,
                 quota_EC: torch.Tensor) -> torch.Tensor:
    """Physical slot of each routed pair.

    expert_T: [N] logical expert of each pair; rank_in_expert_T: [N] its index among this rank's pairs for
    that expert (token order); copy_slot_EC / quota_EC: [E, C] from `BatchPlan.copy_tables`.
    Returns slot_T [N] int64.
    """
    bounds = quota_EC.cumsum(dim=1)[expert_T]  # [N, C]; column 0 is 0 (home takes the rest)
    copy = (bounds <= rank_in_expert_T.unsqueeze(1)).sum(dim=1)  # first copy whose range ends after i
    copy = torch.where(copy >= copy_slot_EC.shape[1], torch.zeros_like(copy), copy)
    return copy_slot_EC[expert_T, copy]


def physical_routing(routing_map_TE: torch.Tensor, probs_TE: torch.Tensor, copy_slot_EC: torch.Tensor,
                     quota_EC: torch.Tensor, num_slots: int, kernels: str = "torch", pairs: bool = False):
    """Widen Megatron's dense routing map/probs [T, E] to the physical slot space [T, P].

    Every routed pair maps to exactly one slot, so Megatron's `num_out_tokens = T * topk` still holds.
    probs keep their autograd link (index ops only). Returns (routing_map_TP bool, probs_TP), and with
    pairs=True also (slot_TK [T, K] int64 -1 padded, probs_TK [T, K]) for relibra's permute kernels.
    """
    T = routing_map_TE.shape[0]
    tok, exp = routing_map_TE.nonzero(as_tuple=True)  # token-major: pairs in token order
    slot = None
    if kernels != "torch":
        slot = _kernel_slots(routing_map_TE, tok, exp, copy_slot_EC, quota_EC, num_slots, kernels)
    if slot is None:
        # index of each pair among this rank's pairs for its expert, in token order
        idx_TE = routing_map_TE.long().cumsum(dim=0) - 1
        slot = assign_pairs(exp, idx_TE[tok, exp], copy_slot_EC, quota_EC)
    routing_TP = torch.zeros((T, num_slots), dtype=torch.bool, device=routing_map_TE.device)
    routing_TP[tok, slot] = True
    probs_TP = probs_TE.new_zeros((T, num_slots)).index_put((tok, slot), probs_TE[tok, exp])
    if pairs:
        slot_TK, probs_TK = _pairs_by_token(routing_map_TE, tok, slot, probs_TE[tok, exp])
        return routing_TP, probs_TP, slot_TK, probs_TK
    return routing_TP, probs_TP


def _pairs_by_token(routing_map_TE, tok, slot, probs):
    """Pairs (token-major) as [T, K] tables for the permute kernels: slot_TK int64 (-1 where a token has
    fewer than K routed pairs) and probs_TK (0 there), K = most pairs of any token."""
    T = routing_map_TE.shape[0]
    per_row = routing_map_TE.sum(dim=1)
    K = int(per_row.max()) if T else 0
    col = torch.arange(tok.numel(), device=tok.device) - (per_row.cumsum(0) - per_row)[tok]
    slot_TK = torch.full((T, K), -1, dtype=torch.int64, device=tok.device)
    slot_TK[tok, col] = slot
    probs_TK = probs.new_zeros((T, K)).index_put((tok, col), probs)
    return slot_TK, probs_TK


def _kernel_slots(routing_map_TE, tok, exp, copy_slot_EC, quota_EC, num_slots, kernels):
    """Slots from relibra_verl.kernels.assign_slots (Triton, or its torch reference for "auto" off CUDA)."""
    from relibra_verl.kernels import assign_slots
    T = routing_map_TE.shape[0]
    per_row = routing_map_TE.sum(dim=1)
    K = int(per_row.max()) if T else 0
    if K == 0:
        return exp.new_empty(0)
    # rows with fewer routed experts (masked pairs) are padded with -1, which the kernel skips
    col = torch.arange(tok.numel(), device=tok.device) - (per_row.cumsum(0) - per_row)[tok]
    topk_ids = torch.full((T, K), -1, dtype=torch.int64, device=tok.device)
    topk_ids[tok, col] = exp
    slot_TK, _ = assign_slots(topk_ids, copy_slot_EC, quota_EC, num_slots, backend=kernels, validate=False)
    return slot_TK[tok, col].long()
