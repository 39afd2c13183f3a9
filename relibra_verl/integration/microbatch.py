"""Loads of one verl micro-batch, as the MoE layers of this rank will see it under R3.

verl's `forward_step` packs a micro-batch's routes like its THD `input_ids` (`preprocess_thd_engine`: each
sequence padded to a multiple of TP*CP, x2 with zigzag CP; this CP rank's share), splits the rows over the TP
ranks (`scatter_to_sequence_parallel_region`) and replays them only where `build_r3_replay_mask` says so:
every row but each sequence's last (none for a sequence without response). Pad rows and non-replayed rows
keep the live router, so their experts are unknown here: they are counted as unknown, never guessed (the
dispatch rule "beyond the planned count goes home" absorbs them).

This module calls verl's own packing and mask functions, so the rows counted are exactly the rows replayed.
"""
from __future__ import annotations

import numpy as np
import torch

from relibra_verl.integration.routes import RoutesError, from_jagged
from relibra_verl.routing.loads import counts_from_routes


class MissingRoutes(RoutesError):
    """The micro-batch carries no `routed_experts` (R3 off, or routes dropped on the way)."""


def _nested(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.nested.as_nested_tensor([torch.from_numpy(np.ascontiguousarray(p)) for p in parts],
                                         layout=torch.jagged)


class ParallelStateError(RuntimeError):
    """Megatron's parallel state is initialised but its tensor/context-parallel sizes cannot be read: this
    rank cannot tell which rows its layers see, so relibra must not guess (the trainer falls back on every
    EP rank alike, counted, or raises in strict mode)."""


def _model_parallel_sizes() -> tuple[int, int, int]:
    """(tp_size, tp_rank, cp_size) from Megatron's parallel state; (1, 0, 1) when it is not initialised.

    Raises ParallelStateError when the state is initialised but unreadable (a layout this version does not
    know): assuming TP 1 there would count rows this rank never computes."""
    try:
        from megatron.core import parallel_state as mpu
    except ImportError:  # no megatron: single rank semantics
        return 1, 0, 1
    try:
        if not mpu.model_parallel_is_initialized():
            return 1, 0, 1
        return (mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank(),
                mpu.get_context_parallel_world_size())
    except Exception as exc:
        raise ParallelStateError(f"cannot read Megatron's tensor/context-parallel sizes "
                                 f"({type(exc).__name__}: {exc})") from exc


def local_route_rows(micro_batch, *, num_experts: int, moe_layers: np.ndarray, num_layers: int | None,
                     fp8_padding: bool = False) -> np.ndarray:
    """This rank's MoE-layer routes of a V1 micro-batch, row for row as the layers see them.

    micro_batch: a verl TensorDict with jagged `input_ids`, `routed_experts` and `response_mask`.
    Returns int32 [N_local, L, K]: expert id where R3 replays the row, -1 where the row is a pad row or
    left to the live router.
    """
    from verl.utils.megatron.router_replay_utils import build_r3_replay_mask

    routes = micro_batch.get("routed_experts", None) if hasattr(micro_batch, "get") else None
    if routes is None:
        raise MissingRoutes("micro-batch has no routed_experts (is R3 routing replay on?)")
    input_ids = micro_batch["input_ids"]
    if not getattr(input_ids, "is_nested", False):
        raise RoutesError("relibra expects verl's no-padding (jagged input_ids) micro-batches")
    seq_lens = [int(n) for n in input_ids.offsets().diff().tolist()]
    per_sample = from_jagged(routes, seq_lens, num_experts=num_experts, moe_layers=moe_layers,
                             num_layers=num_layers)
    replay = build_r3_replay_mask(input_ids, micro_batch["response_mask"])
    for ids, keep in zip(per_sample, replay.unbind()):
        ids[~keep.cpu().numpy().astype(bool)] = -1

    tp_size, tp_rank, cp_size = _model_parallel_sizes()
    if tp_size == 1 and cp_size == 1 and not fp8_padding:
        return np.concatenate(per_sample) if per_sample else np.zeros((0, len(moe_layers), 0), np.int32)
    # Same packing as set_router_replay_data: ids + 1 so that verl's zero pad rows read back as -1.
    from verl.models.mcore.util import preprocess_thd_engine

    packed, _, _ = preprocess_thd_engine(_nested([p.astype(np.int64) + 1 for p in per_sample]),
                                         pre_process=True, use_fp8_padding=fp8_padding)
    rows = packed.squeeze(0).cpu().numpy().astype(np.int64) - 1
    if tp_size > 1:
        rows = np.array_split(rows, tp_size)[tp_rank]  # scatter_to_sequence_parallel_region: equal chunks
    return rows.astype(np.int32)


def micro_batch_loads(micro_batch, *, num_experts: int, moe_layers: np.ndarray,
                      num_layers: int | None, fp8_padding: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(counts [L, E] int64, unknown [L] int64) routed pairs of this rank's share of the micro-batch."""
    rows = local_route_rows(micro_batch, num_experts=num_experts, moe_layers=moe_layers,
                            num_layers=num_layers, fp8_padding=fp8_padding)
    counts = counts_from_routes(rows, num_experts)
    unknown = (rows < 0).sum(axis=(0, 2)).astype(np.int64)
    return counts, unknown
