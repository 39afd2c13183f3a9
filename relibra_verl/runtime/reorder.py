"""Expert reordering: move experts between home slots after `optimizer.step()`, and canonical order.

Placement `expert_at_home [L, E]`: logical expert in each home slot (slot h = local expert h % S of EP rank
h // S). `apply_placement` makes every local expert module hold the expert the new placement names,
moving, per moved expert, its model weights (bf16 or fp32), the fp32 main parameters and every optimizer
state tensor of the parameter's shape (Adam exp_avg / exp_avg_sq) over the EP group with one all-to-all
per dtype. Optimizers understood: a plain torch optimizer over the model parameters, Megatron's
`Float16OptimizerWithFloat16Params`, `DistributedOptimizer` (when each rank owns its experts' full state,
i.e. expert-data-parallel size 1; larger sizes are refused; tested for real on CPU/gloo, see
cpu_compat) and `ChainedOptimizer` of those. Gradient
buffers are not moved: call it between `optimizer.step()` and the next micro-batch (grads are zeroed then).

`canonical_order(rt, optimizer)` is a context manager that moves every layer to Megatron's identity
placement for the duration (state_dict / sharded_state_dict / checkpoint save / weight export to the rollout
engine), then restores the applied placement.
"""
from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
import torch.distributed as dist

from relibra_verl.planner.types import invert_placement
from relibra_verl.runtime.moe import RelibraRuntime, RelibraRuntimeError


def _optimizer_states(optimizer, p: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(kind, tensor) of what belongs to model parameter p in `optimizer`, full size: kind "main_params" (fp32
    main copy) or "optimizer_state" (Adam exp_avg / exp_avg_sq). Tensors sharing p's storage (the fp32 main
    param of an fp32 parameter under the DistributedOptimizer is a view of it) move with p already."""
    if optimizer is None:
        return []
    if hasattr(optimizer, "chained_optimizers"):
        out = []
        for opt in optimizer.chained_optimizers:
            out += _optimizer_states(opt, p)
        return out
    if hasattr(optimizer, "model_param_group_index_map"):  # Megatron DistributedOptimizer
        if p not in optimizer.model_param_group_index_map:
            return []
        rng = optimizer._get_model_param_range_map(p)["param"]
        if rng.size != p.numel():
            raise RelibraRuntimeError(
                "reordering with a DistributedOptimizer that shards expert parameters across expert-data-"
                "parallel ranks is not supported yet (expert DP size must be 1)")
        tensors = optimizer._get_main_param_and_optimizer_states(p)
        return [("main_params" if k == "param" else "optimizer_state", t) for k, t in tensors.items()
                if torch.is_tensor(t) and t.numel() == p.numel() and not _same_storage(t, p)]
    if hasattr(optimizer, "float16_groups"):  # Megatron Float16OptimizerWithFloat16Params
        for mg, fg in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            for mp, fp in zip(mg, fg):
                if mp is p:
                    return [("main_params", fp)] + _torch_state(optimizer.optimizer, fp)
        return _torch_state(optimizer.optimizer, p)
    if hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        return _torch_state(optimizer.optimizer, p)
    return _torch_state(optimizer, p)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _torch_state(opt, p) -> list[tuple[str, torch.Tensor]]:
    st = opt.state.get(p, {}) if hasattr(opt, "state") else {}
    return [("optimizer_state", v) for _, v in sorted(st.items())
            if torch.is_tensor(v) and v.numel() == p.numel() and v.dim() > 0]


def _expert_tensors(state, i: int, optimizer, grads: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(kind, tensor) of local expert i: weights, then its optimizer tensors (and gradients if asked)."""
    params = dict(state.layer.experts.named_parameters())
    out = []
    for n in state.param_names[i]:
        p = params[n]
        out.append(("weights", p.data))
        out += _optimizer_states(optimizer, p)
        if grads:  # only for inspection (verify): gradients are normally consumed before reordering
            out += [("grads", g) for g in (p.grad, getattr(p, "main_grad", None)) if g is not None]
    return out


def apply_placement(rt: RelibraRuntime, expert_at_home: np.ndarray, optimizer=None, grads: bool = False) -> int:
    """Move experts so that home slot h of layer l holds expert_at_home[l, h] (collective over EP).

    expert_at_home: [L, E] permutation per layer (as in BatchPlan.expert_at_home). Returns bytes this rank
    received (split by kind, cumulated, in `rt.metrics.migration_bytes_by_kind`). Every EP rank must call it
    with the same placement (checked: same error on every rank).
    """
    t = rt.topo
    new = np.asarray(expert_at_home, dtype=np.int64)
    L = len(rt.layers)
    err = None
    if new.shape != (L, t.E) or not (np.sort(new, axis=1) == np.arange(t.E)).all():
        err = f"placement must be a permutation of {t.E} experts per layer for {L} layers; got shape {new.shape}"
    gathered = [None] * t.G
    dist.all_gather_object(gathered, (err, hashlib.sha256(new.tobytes()).hexdigest()), group=rt.ep_group)
    errs = [e for e, _ in gathered if e is not None]
    if errs:
        raise RelibraRuntimeError(f"apply_placement rejected: {errs[0]}")
    if len({h for _, h in gathered}) != 1:
        raise RelibraRuntimeError("EP ranks asked for different placements in apply_placement")
    rt.replicas.invalidate()  # pending sends read the old weights; the pool's contents go stale
    S, me = t.S, rt.ep_rank
    received = 0
    for l, state in enumerate(rt.layers):
        old_home = invert_placement(rt.expert_at_home[l:l + 1])[0]  # [E] home slot of each expert
        new_home = invert_placement(new[l:l + 1])[0]
        moved = [(int(e), int(old_home[e]), int(new_home[e])) for e in range(t.E) if old_home[e] != new_home[e]]
        if not moved:
            continue
        sends = sorted((nh // S, nh % S, oh % S) for e, oh, nh in moved if oh // S == me)  # (dest, dst i, src i)
        # both sides order a (src, dest) pair's experts by destination slot
        recvs = sorted((oh // S, nh % S, nh % S) for e, oh, nh in moved if nh // S == me)  # (src, dst i, dst i)
        sample = _expert_tensors(state, 0, optimizer, grads)
        dtypes = sorted({x.dtype for _, x in sample}, key=str)
        by_kind = rt.metrics.migration_bytes_by_kind
        for kind, x in sample:  # every expert of a layer has the same tensors
            by_kind[kind] = by_kind.get(kind, 0) + len(recvs) * x.numel() * x.element_size()
        send_counts = np.bincount([d for d, _, _ in sends], minlength=t.G)
        recv_counts = np.bincount([s for s, _, _ in recvs], minlength=t.G)
        for dt in dtypes:
            numel = sum(x.numel() for _, x in sample if x.dtype == dt)
            src = {i: torch.cat([x.reshape(-1) for _, x in _expert_tensors(state, i, optimizer, grads)
                                 if x.dtype == dt])
                   for i in {si for _, _, si in sends}}
            send = torch.cat([src[si] for _, _, si in sends]) if sends else sample[0][1].new_empty(0, dtype=dt)
            recv = send.new_empty(len(recvs) * numel)
            dist.all_to_all_single(recv, send, [int(c) * numel for c in recv_counts],
                                   [int(c) * numel for c in send_counts], group=rt.ep_group)
            received += recv.numel() * recv.element_size()
            for j, (_, _, di) in enumerate(recvs):
                chunk = recv[j * numel:(j + 1) * numel]
                off = 0
                for _, x in _expert_tensors(state, di, optimizer, grads):
                    if x.dtype != dt:
                        continue
                    with torch.no_grad():
                        x.copy_(chunk[off:off + x.numel()].view_as(x))
                    off += x.numel()
    rt.expert_at_home = new.copy()
    rt._tables = {}
    rt.metrics.migration_bytes += received
    return received


@contextlib.contextmanager
def canonical_order(rt: RelibraRuntime, optimizer=None, grads: bool = False):
    """Within the block every layer holds Megatron's identity placement (checkpoints, weight export)."""
    applied = rt.expert_at_home.copy()
    identity = np.tile(np.arange(rt.topo.E, dtype=np.int64), (len(rt.layers), 1))
    apply_placement(rt, identity, optimizer, grads)
    try:
        yield
    finally:
        apply_placement(rt, applied, optimizer, grads)
