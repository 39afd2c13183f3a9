"""Triton kernels for replication-aware token dispatch, each with its plain-torch reference.

Public API (shapes: T tokens, K top-k, H hidden, E experts, C copies per expert, N unmasked pairs):
  assign_slots(topk_ids [T, K], copy_slot [E, C], quota [E, C], num_slots, backend)
      -> slot_of_pair [T, K] int64 (-1 masked), slot_counts [num_slots] int64
  permute(hidden [T, H], probs [T, K], slot_of_pair, slot_counts, backend)
      -> permuted [N, H], permuted_probs [N], row_index [T, K] int64
  unpermute(expert_out [N, H], probs [T, K], row_index [T, K], T, backend) -> out [T, H]
backend: "auto" (Triton on CUDA tensors, the torch reference otherwise), "triton" (on CPU tensors only
with TRITON_INTERPRET=1: Triton's interpreter), "torch" (the reference). The `*_reference` functions are
the single plain-torch implementation shared by the tests and the fallback.
"""
from ._utils import BACKENDS, HAVE_TRITON, interpreter_enabled, resolve_backend
from .slot_assign import assign_slots, assign_slots_reference
from .token_permute import permute, permute_reference, unpermute, unpermute_reference

__all__ = [
    "BACKENDS",
    "HAVE_TRITON",
    "assign_slots",
    "assign_slots_reference",
    "interpreter_enabled",
    "permute",
    "permute_reference",
    "resolve_backend",
    "unpermute",
    "unpermute_reference",
]
