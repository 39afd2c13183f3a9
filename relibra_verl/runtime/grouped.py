"""Replica slots as extra groups of the grouped GEMM (`TEGroupedMLP` experts).

One experts call computes home and replica slots together: the grouped linears (fc1, fc2) are given S + R
groups for the duration of the call, groups S.. holding the replica weights fetched from their owners
(`_extra_groups`; a grouped linear reads its groups as `weight{i}` for i < num_gemms, as Transformer Engine's
GroupedLinear does). No GEMM call is added per replica.

Autograd, per layer call with a replica in the node (every rank of the node takes part, so the collectives
stay in step even where a rank's own replica slots are empty):

  hidden --_ReplicaWeights--> (hidden, replica weights) --grouped MLP--> out --_AcquireInBackward--> out

* `_AcquireInBackward`, first in the layer's backward: makes the pool hold this (micro-batch, layer)'s
  replica weights again (send-ahead reuse or a new fetch into the same places, so the views the grouped GEMM
  saved are valid) and requests layer l-1's.
* `_ReplicaWeights.backward`, after the grouped GEMM's backward produced the replica weight gradients: posts
  them to their owners (point-to-point in the node, non-blocking) and returns. The owners' parameters are
  inputs of `_ReplicaWeights`, so their gradient is not accumulated before the receives are posted;
  `GradReturn` waits for them only where the gradient is consumed: before Megatron DDP starts reducing the
  parameter's bucket (`RelibraRuntime.attach_ddp`), else at the end of the backward.
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist

from relibra_verl.runtime.moe import _fetch, _in_backward, _PrefetchInBackward, _sync_plan

GRAD_TAG = 1 << 20  # point-to-point tag space of gradient returns (weight fetches use the layer index)


def grouped_linears(experts, names: list[str], S: int) -> list | None:
    """[(linear module, "weight"|"bias")] for local expert 0's parameter names when the experts module is a
    grouped MLP (its linears have `num_gemms` == S); None for other experts modules."""
    out = []
    for n in names:
        path, _, leaf = n.rpartition(".")
        mod = experts.get_submodule(path) if path else experts
        match = re.fullmatch(r"(weight|bias)0", leaf)
        if match is None or getattr(mod, "num_gemms", None) != S:
            return None
        out.append((mod, match.group(1)))
    return out


@contextlib.contextmanager
def _extra_groups(state, weights_by_slot: list[list[torch.Tensor]]):
    """Give each grouped linear S + R groups for one call: groups S + k hold weights_by_slot[k] (one tensor
    per expert parameter, in `state.grouped` order)."""
    S = state.runtime.topo.S
    R = len(weights_by_slot)
    mods = {id(mod): mod for mod, _ in state.grouped}
    set_names = []
    try:
        for mod in mods.values():
            mod.num_gemms = S + R
        for k, tensors in enumerate(weights_by_slot):
            for (mod, kind), t in zip(state.grouped, tensors):
                name = f"{kind}{S + k}"
                mod.__dict__[name] = t  # a plain attribute: not a parameter of the module
                set_names.append((mod, name))
        yield
    finally:
        for mod, name in set_names:
            mod.__dict__.pop(name, None)
        for mod in mods.values():
            mod.num_gemms = S


def grouped_forward(experts, stock_forward, state, m: int, rep, hidden, tpe, probs, kwargs):
    """Home and replica slots in one call of the grouped MLP (see the module docstring)."""
    rt = state.runtime
    S, R = rt.topo.S, rt.topo.R
    plan = _sync_plan(rt, state, rep)
    if plan is None:  # no replica in this node for this (micro-batch, layer): the stock call over home slots
        if int(tpe[S:].sum()):
            raise RuntimeError("tokens dispatched to a replica slot of a layer without replicas")
        out, bias = stock_forward(hidden, tpe[:S], probs, **kwargs)
        if rt.prefetch and out.requires_grad and state.index > 0:
            out = _PrefetchInBackward.apply(out, rt, m, state.index - 1)
        return out, bias
    flat = rt.replicas.acquire(m, state.index) if rt.prefetch else _fetch(experts, plan)
    params = dict(experts.named_parameters())
    owner = [params[n] for names in state.param_names for n in names]
    shapes = [params[n].shape for n in state.param_names[0]]
    info = (rt, state, plan, m, flat, shapes)
    hidden, *rep_weights = _ReplicaWeights.apply(info, hidden, *owner)
    per = len(shapes)
    got = {k: rep_weights[j * per:(j + 1) * per] for j, (_, k) in enumerate(plan.recv)}
    # an empty replica slot computes no row: any tensor of the right shape stands in for its weights
    empty = [params[n].detach() for n in state.param_names[0]]
    with _extra_groups(state, [list(got.get(k, empty)) for k in range(R)]):
        out, bias = stock_forward(hidden, tpe, probs, **kwargs)
    if out.requires_grad:
        out = _AcquireInBackward.apply(out, info)
    return out, bias


class _ReplicaWeights(torch.autograd.Function):
    """Identity on the dispatched tokens that also yields the replica weights (views of the pool) as tensors
    of the graph; its backward sends their gradients to the owners (see `GradReturn.post`)."""

    @staticmethod
    def forward(ctx, info, hidden, *owner_params):
        rt, state, plan, m, flat, shapes = info
        ctx.info = info
        outs = []
        for _, k in plan.recv:
            off = 0
            for shape in shapes:
                n = shape.numel()
                outs.append(flat[k][off:off + n].view(shape))
                off += n
        return (hidden.view_as(hidden), *outs)

    @staticmethod
    def backward(ctx, grad_hidden, *grad_weights):
        rt, state, plan, m, flat, shapes = ctx.info
        per = len(shapes)
        grads = {}
        for j, (_, k) in enumerate(plan.recv):
            gs = grad_weights[j * per:(j + 1) * per]
            grads[k] = torch.cat([(g if g is not None else torch.zeros(s, dtype=flat[k].dtype,
                                                                        device=flat[k].device)).reshape(-1)
                                  for g, s in zip(gs, shapes)])
        rt.grad_return.post(state, plan, grads)
        n_owner = sum(len(names) for names in state.param_names)
        return (None, grad_hidden, *([None] * n_owner))


class _AcquireInBackward(torch.autograd.Function):
    """Identity on the experts' output; its backward (the first step of the layer's backward) makes the pool
    hold this layer's replica weights again and requests layer l-1's."""

    @staticmethod
    def forward(ctx, out, info):
        ctx.info = info
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        rt, state, plan, m, flat, shapes = ctx.info
        rt._event("experts_backward", state.index)
        if rt.prefetch:
            rt.replicas.prefetch(m, state.index - 1)
            again = rt.replicas.acquire(m, state.index)
        else:
            again = _fetch(state.layer.experts, plan)
        for k, t in flat.items():  # the saved views must see these weights: same places in the same pool
            if again[k].data_ptr() != t.data_ptr():
                raise RuntimeError("relibra: replica weights came back to a different place of the pool")
        return grad, None


class GradReturn:
    """Replica weight gradients on their way to the owners' parameters (grouped and sequential experts).

    `post` (in a layer's backward) sends this rank's replica gradients and posts the receives of its own
    experts' gradients, non-blocking (their buffers, while in flight, count in metrics.peak_send_bytes); `drain` waits and adds what arrived into each owner parameter
    (`main_grad` when Megatron DDP gave it one, else `.grad`), summed in a fixed (sender, slot) order."""

    def __init__(self, rt):
        self.rt = rt
        self.pending: list = []       # (layer, works, [(param, flat grad slice view)], keepalive)
        self.ddp_params: set = set()  # parameters whose DDP bucket waits for us (RelibraRuntime.attach_ddp)
        self._callback_task = None    # the backward pass whose end drains what is still in flight
        self.inflight_bytes = 0       # send + receive buffers of the returns in flight (metrics.peak_send_bytes)

    def post(self, state, plan, grads: dict) -> None:
        rt = self.rt
        l = state.index
        peers = [rt.global_ranks[r] for r in rt.node_ranks[rt.node]]
        params = dict(state.layer.experts.named_parameters())
        ops, sends, recvs = [], [], []
        for j, k in plan.recv:  # (source, k) order on the holder ...
            g = grads[k].contiguous()
            sends.append(g)
            ops.append(dist.P2POp(dist.isend, g, peers[j], rt.node_group, tag=GRAD_TAG + l))
        first = params[state.param_names[0][0]]
        for j, _, i in plan.send:  # ... (dest, k) order on the owner: the same order per pair
            buf = torch.empty(state.numel, dtype=first.dtype, device=first.device)
            ops.append(dist.P2POp(dist.irecv, buf, peers[j], rt.node_group, tag=GRAD_TAG + l))
            off = 0
            for n in state.param_names[i]:
                p = params[n]
                recvs.append((p, buf[off:off + p.numel()].view_as(p)))
                off += p.numel()
        works = dist.batch_isend_irecv(ops) if ops else []
        sent = sum(g.numel() * g.element_size() for g in sends)
        rt.metrics.grad_reduce_bytes += sent
        self.inflight_bytes += sent + len(plan.send) * state.numel * first.element_size()
        rt.metrics.peak_send_bytes = max(rt.metrics.peak_send_bytes, self.inflight_bytes)
        rt._event("grad_send", l)
        self.pending.append((l, works, recvs, sends))
        if any(hasattr(p, "main_grad") and p not in self.ddp_params for p, _ in recvs):
            # DDP may reduce this parameter's bucket as soon as its gradient is accumulated, and no bucket hook
            # tells us when: wait now
            rt.metrics.grad_returns_blocking += 1
            self.drain()
            return
        rt.metrics.grad_returns_async += 1
        task = torch._C._current_graph_task_id()
        if self._callback_task != task:  # once per backward pass (a failed one leaves no stale flag)
            self._callback_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self.drain)

    def drain(self, params=None) -> None:
        """Wait for the returns into `params` (all when None) and add them to their owners' gradients."""
        keep = []
        for entry in self.pending:
            l, works, recvs, sends = entry
            if params is not None and not any(p in params for p, _ in recvs):
                keep.append(entry)
                continue
            for w in works:
                w.wait()
            self.rt._event("grad_wait", l)
            for p, g in recvs:
                if hasattr(p, "main_grad"):
                    p.main_grad.add_(g.to(p.main_grad.dtype))
                elif p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        self.pending = keep
        self.inflight_bytes = sum(sum(g.numel() * g.element_size() for g in sends) +
                                  sum(g.numel() * g.element_size() for _, g in recvs)
                                  for _, _, recvs, sends in keep)
