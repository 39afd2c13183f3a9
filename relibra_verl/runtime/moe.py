"""Replication-aware execution of Megatron-Core 0.19 MoE layers (all-to-all dispatcher).

The runtime executes plans; it never decides them. Per patched MoE layer:

* dispatcher: a `MoEAlltoAllTokenDispatcher` subclass whose `dispatch_preprocess` (on every call path:
  MoELayer and the EP-overlap schedule) widens the routing map from logical experts [T, E] to physical
  slots [T, G*(S+R)], rank-major (rank r owns [r*(S+R), (r+1)*(S+R)), homes first). Only the dispatcher
  sees the widened config; the layer's own config stays logical.
* experts: the existing experts module keeps its class behaviour for the S home slots (stock code runs
  them) and gains replica slots: the same module structure run by `torch.func.functional_call` with the
  local expert's parameters swapped for fetched replica weights. The only structural assumption is how a
  local expert's parameters are named: `local_experts.{i}.*` (SequentialMLP) or `*weight{i}` /
  `*bias{i}` (TEGroupedMLP-style); see `_expert_param_names`. Used for SequentialMLP (grouped experts run
  their replicas inside the grouped call instead, below).
* replica weights: fetched from the home rank inside the node group by `_ReplicaExperts`, an autograd
  function that also takes the dispatched tokens (so every rank of the node joins the backward
  collective, even with empty replica slots) and sends the replica gradients back to the owner's parameters
  without blocking (runtime/grouped.py `GradReturn`: waited for before DDP reduces the parameter's bucket,
  or at the end of the backward; added to `main_grad` when Megatron's DDP gave the parameter one). Weights live only in a pool shared
  by all layers; the forward computes without saving weights, the backward recomputes the (small) replica
  GEMMs with weights fetched again unless the pool still holds them.
* send-ahead (`prefetch=True`, the default): the plan is known before the step, so a layer's replica weights
  are requested with point-to-point isend/irecv on the node group before they are needed: layer l's own at
  its dispatch (overlapping the token all-to-all), layer l+1's while layer l computes, and in the backward
  layer l-1's while layer l computes. The pool is double-buffered (layer l uses buffer l % 2: 2 x R expert
  slots per rank instead of R), and after a forward it still holds the last two layers' replicas, which
  their backward reuses. `prefetch=False`: one buffer, a blocking all-to-all fetch per use.

* grouped experts (`TEGroupedMLP`): replica slots are extra groups of the same grouped-GEMM call
  (runtime/grouped.py).
* permutation 1 over physical slots: relibra's Triton kernels with `kernels="triton"` (or "auto" on CUDA), and
  their torch reference in place of TE's fused permute when the config asks for `moe_permute_fusion`;
  Megatron's unfused permute otherwise (`_permute_backend`; each call counted in metrics.permute_calls).
* executed balance: tokens per physical slot counted on device per (micro-batch, layer), read at step end
  (`executed_tokens`, runtime/executed.py).

Not supported yet (refused at patch time with a clear error): EP-overlap schedule, delayed wgrad,
CUDA-graph capture of the MoE preprocess, drop-and-pad, router padding for quantization, expert TP > 1, and
for grouped experts the TE op-fuser path and FP8/FP4. MoE-layer recompute works (micro-batches are replayed
FIFO in the recompute, as Megatron's RouterReplay does).
"""
from __future__ import annotations

import copy
import dataclasses
import types

import numpy as np
import torch
import torch.distributed as dist

from relibra_verl.planner.types import BatchPlan, PlanError, Topology, invert_placement
from relibra_verl.runtime.executed import ExecutedCounts
from relibra_verl.runtime.slots import physical_routing


class RelibraRuntimeError(PlanError):
    """A plan or configuration the runtime cannot execute; raised identically on every EP rank."""


@dataclasses.dataclass
class RuntimeMetrics:
    """Counters read at step boundaries (no host sync added to the forward for them)."""

    fallback_micro_batches: int = 0  # layer calls without a plan (home-only dispatch)
    replica_sync_bytes: int = 0      # weights received into replica slots (forward + backward refetch)
    grad_reduce_bytes: int = 0       # replica gradients sent back to owners
    pool_bytes: int = 0              # replica pool (R expert slots, x2 with prefetch; shared by all layers)
    peak_send_bytes: int = 0         # largest transient buffers: one fetch's send, one grad reduction's send + recv
    migration_bytes: int = 0         # expert state moved by reordering (what this rank received)
    migration_bytes_by_kind: dict = dataclasses.field(default_factory=dict)  # weights / main_params / optimizer_state
    fetches_ahead: int = 0           # replica fetches issued before the layer needed them (prefetch)
    fetches_blocking: int = 0        # replica fetches issued when needed (no prefetch, or a miss)
    fetches_reused: int = 0          # backward uses served by weights still in the pool (no transfer)
    grad_returns_async: int = 0      # replica-gradient returns left in flight past their layer's backward
    grad_returns_blocking: int = 0   # ... waited for at once (DDP params with main_grad and no attach_ddp)
    permute_calls: dict = dataclasses.field(default_factory=dict)  # dispatches by permute path (_permute_backend)


# --------------------------------------------------------------------------------------------------
# runtime state
# --------------------------------------------------------------------------------------------------
class RelibraRuntime:
    """Plan execution state of one EP group (one instance per process).

    Usage (verl glue): build the model, `rt = RelibraRuntime(topo, ep_group)`, `rt.patch_layer(layer, l)` for
    each MoE layer l in model order; per batch `rt.set_plan(plan)` (collective: validates and hash-checks on
    every EP rank); per micro-batch `rt.set_micro_batch(m)` before its forward.
    """

    def __init__(self, topo: Topology, ep_group=None, kernels: str = "auto", strict: bool = False,
                 prefetch: bool = True):
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch; got {kernels!r}")
        self.prefetch = bool(prefetch)
        self.topo = topo
        self.ep_group = ep_group if ep_group is not None else dist.group.WORLD
        self.ep_rank = dist.get_rank(self.ep_group)
        if dist.get_world_size(self.ep_group) != topo.G:
            raise RelibraRuntimeError(
                f"EP group has {dist.get_world_size(self.ep_group)} ranks, topology says {topo.G}")
        self.kernels = kernels
        self.strict = strict
        self.global_ranks = dist.get_process_group_ranks(self.ep_group)
        # one group per node; every process must create every group, in the same order
        self.node_ranks = topo.node_ranks()  # [N, g] EP ranks
        self.node = topo.node_of_rank[self.ep_rank]
        self.node_group = None
        if topo.R > 0:
            for n in range(topo.num_nodes):
                grp = dist.new_group([self.global_ranks[r] for r in self.node_ranks[n]])
                if n == self.node:
                    self.node_group = grp
            # first op on the node group with every member (batched p2p ops later may involve a pair only)
            dist.barrier(group=self.node_group)
        self.layers: list = []
        self.plan: BatchPlan | None = None
        self.micro_batch = 0
        self.expert_at_home: np.ndarray | None = None  # [L, E] current placement
        self.metrics = RuntimeMetrics()
        self._pool: torch.Tensor | None = None
        self._tables: dict = {}
        self.replicas = _ReplicaBuffers(self)  # send-ahead pool (used when prefetch is on)
        from relibra_verl.runtime.grouped import GradReturn  # grouped imports this module

        self.grad_return = GradReturn(self)    # replica gradients in flight to their owners (grouped experts)
        self.executed = ExecutedCounts()       # tokens each physical slot computed, on device
        self.events: list | None = None        # set to [] to record the order of transfers (tests)

    # ---- layers ----------------------------------------------------------------------------------
    def patch_layer(self, layer, layer_index: int) -> None:
        """Swap in the replication-aware dispatcher and experts on an existing Megatron MoELayer."""
        if layer_index != len(self.layers):
            raise RelibraRuntimeError(f"patch MoE layers in model order: expected index {len(self.layers)}")
        _check_supported(layer.config)
        t = self.topo
        if layer.config.num_moe_experts != t.E or layer.num_local_experts != t.S:
            raise RelibraRuntimeError(
                f"layer has {layer.config.num_moe_experts} experts ({layer.num_local_experts} local), "
                f"topology E={t.E} S={t.S}")
        old = layer.token_dispatcher
        if not isinstance(old, _alltoall_cls()):
            raise RelibraRuntimeError("relibra needs moe_token_dispatcher_type='alltoall'")
        state = _LayerState(self, layer_index, layer)
        layer.token_dispatcher = _make_dispatcher(old, t, self.ep_rank, state)
        if hasattr(layer, "_training_token_dispatcher"):
            layer._training_token_dispatcher = layer.token_dispatcher
        if old.shared_experts is not None:
            layer.token_dispatcher.set_shared_experts(old.shared_experts)
        experts = layer.experts
        experts.__class__ = _relibra_experts_class(type(experts))
        experts._relibra = state
        experts._relibra_plain = False
        state.param_names = [_expert_param_names(experts, i) for i in range(t.S)]
        state.numel = sum(dict(experts.named_parameters())[n].numel() for n in state.param_names[0])
        state.grouped = _grouped_linears(experts, state.param_names[0], t.S)
        self.layers.append(state)
        if self.expert_at_home is None or self.expert_at_home.shape[0] < len(self.layers):
            ident = np.arange(t.E, dtype=np.int64)[None]
            self.expert_at_home = (ident if self.expert_at_home is None
                                   else np.concatenate([self.expert_at_home, ident]))

    # ---- plans -----------------------------------------------------------------------------------
    def set_plan(self, plan: BatchPlan | None) -> None:
        """Install the batch plan on every EP rank (collective). Raises the same error on every rank
        if any rank's plan is invalid or the ranks' plans differ; None means home-only dispatch."""
        self._agree(plan, None if plan is None else self._validate(plan))
        self.replicas.invalidate()
        self.executed.reset()
        self.plan = plan
        self.micro_batch = 0
        self._tables = {}

    def extend_plan(self, plan: BatchPlan | None, error: str | None = None) -> None:
        """Replace the installed plan by one that covers more micro-batches and equals it on those it
        covers (collective, checked like set_plan): the rest of a mini-batch, planned while its first
        micro-batches ran. The current micro-batch, cached tables and replica weights stay. error: this
        rank could not make the plan (plan None); every rank raises it."""
        if error is not None:
            err = f"extend_plan: {error}"
        elif self.plan is None:
            err = "extend_plan: no plan installed to extend"
        elif plan is None:
            err = "extend_plan: no plan given"
        else:
            M0 = self.plan.num_micro_batches
            err = self._validate(plan)
            if err is None and (plan.num_micro_batches < M0
                                or not np.array_equal(plan.replica_expert[:M0], self.plan.replica_expert)
                                or not np.array_equal(plan.replica_quota[:M0], self.plan.replica_quota)):
                err = f"extend_plan: the new plan does not begin with the installed plan's {M0} micro-batch(es)"
        self._agree(plan, err)
        self.plan = plan

    def _agree(self, plan: BatchPlan | None, err: str | None) -> None:
        """Every EP rank's local error (None: its plan is valid) and plan digest, all-gathered: raises the
        same error on every rank if any rank's plan is invalid or the ranks' plans differ."""
        digest = None if plan is None else plan.digest()
        gathered = [None] * self.topo.G
        dist.all_gather_object(gathered, (digest, err), group=self.ep_group)
        bad = [(r, e) for r, (_, e) in enumerate(gathered) if e is not None]
        if bad:
            ranks = [r for r, _ in bad]
            raise RelibraRuntimeError(f"relibra plan rejected on EP ranks {ranks}: {bad[0][1]}")
        digests = [d for d, _ in gathered]
        if len(set(digests)) != 1:
            groups: dict = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            raise RelibraRuntimeError(
                "EP ranks hold different relibra plans (digest mismatch; the planner must be a deterministic "
                f"function of the all-gathered loads): rank groups {sorted(groups.values())}")

    def set_micro_batch(self, m: int) -> None:
        """Select the micro-batch whose replicas/quotas the next layer calls execute."""
        if self.plan is not None and not 0 <= m < self.plan.num_micro_batches:
            raise RelibraRuntimeError(f"micro-batch {m} outside the plan's {self.plan.num_micro_batches}")
        self.micro_batch = m

    def _validate(self, plan: BatchPlan) -> str | None:
        """Local checks; returns an error line or None."""
        t, p = self.topo, plan.topo
        if (p.E, p.G, p.R, tuple(p.node_of_rank)) != (t.E, t.G, t.R, tuple(t.node_of_rank)):
            return (f"plan is for E={p.E} G={p.G} R={p.R} nodes={list(p.node_of_rank)}, the runtime has "
                    f"E={t.E} G={t.G} R={t.R} nodes={list(t.node_of_rank)}")
        L, M = len(self.layers), plan.num_micro_batches
        shapes = {"expert_at_home": (plan.expert_at_home.shape, (L, t.E)),
                  "replica_expert": (plan.replica_expert.shape, (M, L, t.G, t.R)),
                  "replica_quota": (plan.replica_quota.shape, (M, L, t.G, t.R, t.G))}
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                return f"plan.{name} has shape {tuple(got)}, expected {want} ({L} patched MoE layers)"
        eah = plan.expert_at_home
        if not (np.sort(eah, axis=1) == np.arange(t.E)).all():
            return "plan.expert_at_home is not a permutation of the experts in every layer"
        if not (eah == self.expert_at_home).all():
            return "plan placement differs from the applied one: call apply_placement() after optimizer.step()"
        rep, quota = plan.replica_expert, plan.replica_quota
        if ((rep < -1) | (rep >= t.E)).any():
            return "plan.replica_expert holds ids outside [-1, E)"
        if (quota < 0).any():
            return "plan.replica_quota is negative"
        if (quota[rep < 0] != 0).any():
            return "plan gives tokens to an empty replica slot"
        home_rank = invert_placement(eah) // t.S  # [L, E]
        nodes = np.asarray(t.node_of_rank)
        for m, l, r, k in zip(*np.nonzero(rep >= 0)):
            e = rep[m, l, r, k]
            h = home_rank[l, e]
            if nodes[h] != nodes[r]:
                return (f"replica of expert {e} (micro-batch {m}, layer {l}) on rank {r} is off its home node "
                        f"(home rank {h}): replicas must stay inside the node")
            if h == r or (rep[m, l, r] == e).sum() > 1:
                return f"rank {r} holds two copies of expert {e} (micro-batch {m}, layer {l})"
        return None

    # ---- per layer call --------------------------------------------------------------------------
    def tables(self, layer_index: int, m: int | None = None):
        """(copy_slot [E, C], quota [E, C], replica_expert [G, R]) of this rank for micro-batch m (default:
        the current one) and a layer; home-only tables when no plan is set."""
        m = self.micro_batch if m is None else m
        key = (m, layer_index)
        if key not in self._tables:
            t = self.topo
            if self.plan is None:
                if self.strict:
                    raise RelibraRuntimeError("no relibra plan set and strict mode is on")
                home = invert_placement(self.expert_at_home)[layer_index]
                copy_slot = np.full((t.E, t.max_copies), -1, dtype=np.int64)
                copy_slot[:, 0] = (home // t.S) * (t.S + t.R) + home % t.S
                quota = np.zeros_like(copy_slot)
                rep = np.full((t.G, t.R), -1, dtype=np.int64)
            else:
                copy_slot, quota = self.plan.copy_tables(m, layer_index, self.ep_rank)
                rep = self.plan.replica_expert[m, layer_index]
            self._tables[key] = (torch.from_numpy(copy_slot), torch.from_numpy(quota), rep)
        if self.plan is None:
            self.metrics.fallback_micro_batches += 1
        return self._tables[key]

    def attach_ddp(self, model_chunks) -> int:
        """Let replica gradients of grouped experts stay in flight until Megatron DDP reduces their bucket:
        each bucket group's `start_grad_sync` first waits for the pending returns into its parameters. Without
        it, a parameter that has `main_grad` (DDP) gets its replica gradients waited for at once. Returns the
        number of bucket groups hooked."""
        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        hooked = 0
        for chunk in chunks:
            for bg in list(getattr(chunk, "bucket_groups", [])) + list(getattr(chunk, "expert_parallel_bucket_groups", [])):
                if getattr(bg, "_relibra_hooked", False):
                    continue
                start = bg.start_grad_sync

                def start_grad_sync(*a, _start=start, _params=bg.params, **k):
                    self.grad_return.drain(_params)
                    return _start(*a, **k)

                bg.start_grad_sync = start_grad_sync
                bg._relibra_hooked = True
                self.grad_return.ddp_params |= set(bg.params)
                hooked += 1
        return hooked

    def executed_tokens(self) -> np.ndarray:
        """Tokens each physical slot computed since the last set_plan, all EP ranks (collective; one host
        read per call, at step end): [M, L, G, S+R] int64, M = micro-batches seen."""
        local = self.executed.read(len(self.layers), self.topo.S + self.topo.R)  # [M, L, S+R]
        gathered = [None] * self.topo.G
        dist.all_gather_object(gathered, local, group=self.ep_group)
        M = max(g.shape[0] for g in gathered)
        out = np.zeros((M, len(self.layers), self.topo.G, self.topo.S + self.topo.R), dtype=np.int64)
        for r, g in enumerate(gathered):
            out[: g.shape[0], :, r] = g
        return out

    def _event(self, kind: str, layer: int) -> None:
        if self.events is not None:
            self.events.append((kind, layer))

    def pool(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The shared replica pool: R expert slots of `numel` elements (grown to the largest expert)."""
        need = self.topo.R * numel
        if self._pool is None or self._pool.numel() < need or self._pool.dtype != dtype:
            self._pool = torch.empty(need, dtype=dtype, device=device)
            self.metrics.pool_bytes = self._pool.numel() * self._pool.element_size()
        return self._pool


def _check_supported(cfg) -> None:
    bad = []
    if getattr(cfg, "overlap_moe_expert_parallel_comm", False):
        bad.append("overlap_moe_expert_parallel_comm (EP-overlap schedule)")
    if getattr(cfg, "delay_wgrad_compute", False) or getattr(cfg, "overlap_dispatch_backward_with_experts_wgrad", False):
        bad.append("delayed weight-gradient computation")
    if getattr(cfg, "moe_pad_expert_input_to_capacity", False):
        bad.append("moe_pad_expert_input_to_capacity (drop-and-pad)")
    if getattr(cfg, "moe_router_padding_for_quantization", False):
        bad.append("moe_router_padding_for_quantization")
    if (getattr(cfg, "expert_tensor_parallel_size", 1) or 1) > 1:
        bad.append("expert_tensor_parallel_size > 1")
    if getattr(cfg, "cuda_graph_impl", "none") != "none":
        bad.append("CUDA-graph capture")
    if getattr(cfg, "moe_grouped_gemm", False):
        if getattr(cfg, "use_transformer_engine_op_fuser", False):
            bad.append("use_transformer_engine_op_fuser (fused grouped MLP: no per-group weights to extend)")
        if getattr(cfg, "fp8", None) or getattr(cfg, "fp4", None):
            bad.append("FP8/FP4 grouped experts (per-group quantization state)")
    if bad:
        raise RelibraRuntimeError("relibra does not support yet: " + ", ".join(bad))


# --------------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------------
def _alltoall_cls():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    return MoEAlltoAllTokenDispatcher


_DISPATCHER_CLS = None


def _dispatcher_cls():
    global _DISPATCHER_CLS
    if _DISPATCHER_CLS is None:

        class RelibraAlltoAllTokenDispatcher(_alltoall_cls()):
            """All-to-all over physical slots: logical -> physical remap in dispatch_preprocess."""

            def dispatch_preprocess(self, hidden_states, routing_map, probs):
                state = self._relibra
                m = state.runtime.micro_batch
                if getattr(state.layer, "moe_layer_recompute", False) and state.layer.training:
                    # checkpointed layer: the first forward runs without grad, the recompute (during the
                    # backward, maybe after other micro-batches) with grad; replay micro-batches FIFO,
                    # as Megatron's RouterReplay does for the routing
                    if not torch.is_grad_enabled():
                        state.recompute_queue.append(m)
                    elif state.recompute_queue:
                        m = state.recompute_queue.pop(0)
                rt = state.runtime
                copy_slot, quota, rep = rt.tables(state.index, m)
                state.active = (m, rep)
                if rt.prefetch:
                    if state.index == 0 and not _in_backward():
                        rt.replicas.invalidate()  # a new forward: weights may have changed since the pool filled
                    rt.replicas.prefetch(m, state.index)  # overlaps the token all-to-all
                backend = _permute_backend(rt.kernels, state.permute_fusion, hidden_states.device)
                rt.metrics.permute_calls[backend] = rt.metrics.permute_calls.get(backend, 0) + 1
                wide = physical_routing(routing_map, probs, copy_slot.to(routing_map.device),
                                        quota.to(routing_map.device), self.num_experts, kernels=rt.kernels,
                                        pairs=backend != "megatron")
                self._relibra_permute = None
                if backend == "megatron":
                    return super().dispatch_preprocess(hidden_states, *wide)
                return self._relibra_dispatch_preprocess(hidden_states, backend, *wide)

            def _relibra_dispatch_preprocess(self, hidden_states, backend, routing_map, probs, slot_TK, probs_TK):
                """The stock preprocess (split sizes from the physical routing map, shared experts, sync point)
                with relibra's permute kernel as permutation 1 (same row order: by slot, then token)."""
                from relibra_verl.kernels import permute

                self.hidden_shape = hidden_states.shape
                self.probs, self.routing_map = probs, routing_map
                hidden = hidden_states.view(-1, self.hidden_shape[-1])
                self.tokens_per_expert = self.preprocess(routing_map)
                if self.shared_experts is not None:
                    self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
                self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1",
                                                                          self.tokens_per_expert)
                self.hidden_shape_before_permute = hidden.shape
                num_out = self.num_out_tokens if isinstance(self.num_out_tokens, int) else None
                permuted, permuted_probs, row_index = permute(
                    hidden, probs_TK, slot_TK, routing_map.sum(dim=0), backend=backend, validate=False,
                    num_out=num_out)
                self._relibra_permute = (backend, row_index, torch.ones_like(probs_TK, dtype=hidden.dtype))
                return permuted, permuted_probs

            def combine_postprocess(self, permutated_local_input_tokens):
                if getattr(self, "_relibra_permute", None) is None:
                    return super().combine_postprocess(permutated_local_input_tokens)
                from relibra_verl.kernels import unpermute

                backend, row_index, ones = self._relibra_permute
                # probs were applied by the experts: unpermutation only sums each token's pairs (weights 1)
                out = unpermute(permutated_local_input_tokens, ones, row_index, row_index.shape[0],
                                backend=backend, validate=False)
                out = out.view(self.hidden_shape)
                if self.shared_experts is not None:
                    out = out + self.shared_experts.get_output()
                return out

        _DISPATCHER_CLS = RelibraAlltoAllTokenDispatcher
    return _DISPATCHER_CLS


def _permute_backend(kernels: str, fusion_asked: bool, device) -> str:
    """Who permutes over physical slots: "triton" (relibra's kernels; the interpreter on CPU), "torch" (their
    torch reference) or "megatron" (Megatron's unfused permute). relibra's kernels take the place of TE's
    fused permute when the user asked for `moe_permute_fusion`; counted per call in metrics.permute_calls."""
    from relibra_verl.kernels import resolve_backend

    if kernels == "triton":
        return resolve_backend("triton", device)  # raises with the reason when Triton cannot run here
    if kernels == "auto" and device.type == "cuda":
        return resolve_backend("auto", device)
    return "torch" if fusion_asked else "megatron"


def _make_dispatcher(old, topo: Topology, ep_rank: int, state):
    wide = copy.copy(old.config)  # shallow: only the dispatcher sees the widened slot space
    wide.num_moe_experts = topo.G * (topo.S + topo.R)
    # permutation 1 is relibra's when fusion was asked (see _permute_backend); the rest of the dispatcher
    # (chunk sort of permutation 2) runs Megatron's unfused code, which needs no Transformer Engine
    state.permute_fusion = bool(getattr(old.config, "moe_permute_fusion", False))
    wide.moe_permute_fusion = False
    spr = topo.S + topo.R
    pgs = types.SimpleNamespace(ep=old.ep_group, expt_tp=old.tp_group, tp_ep=old.tp_ep_group)
    new = _dispatcher_cls()(spr, list(range(ep_rank * spr, (ep_rank + 1) * spr)), config=wide, pg_collection=pgs)
    new._relibra = state
    return new


# --------------------------------------------------------------------------------------------------
# experts
# --------------------------------------------------------------------------------------------------
class _LayerState:
    def __init__(self, runtime: RelibraRuntime, index: int, layer):
        self.runtime = runtime
        self.index = index
        self.layer = layer
        self.active = None  # (micro-batch, replica_expert [G, R]) used by the last dispatch
        self.recompute_queue: list[int] = []  # micro-batches awaiting their recompute (MoE recompute)
        self.param_names: list[list[str]] = []
        self.numel = 0
        self.grouped: list | None = None  # [(linear module, "weight"|"bias")] per expert parameter (grouped GEMM)
        self.permute_fusion = False       # the user asked for moe_permute_fusion (relibra's permute replaces TE's)


def _expert_param_names(experts, i: int) -> list[str]:
    """Names of local expert i's parameters; the only structural assumption about the experts module."""
    names = [n for n, _ in experts.named_parameters()]
    seq = [n for n in names if n.startswith(f"local_experts.{i}.")]
    if seq:
        return seq
    grouped = [n for n in names if n.endswith((f".weight{i}", f".bias{i}"))]
    if grouped:
        return grouped
    raise RelibraRuntimeError(f"cannot find the parameters of local expert {i} in {type(experts).__name__}")


def _grouped_linears(experts, names, S):
    from relibra_verl.runtime.grouped import grouped_linears

    return grouped_linears(experts, names, S)


def _grouped_forward(*args):
    from relibra_verl.runtime.grouped import grouped_forward

    return grouped_forward(*args)


class _RelibraExpertsMixin:
    """Home slots through the stock forward; replica slots through the same structure, fetched weights."""

    def forward(self, hidden, tokens_per_expert, probs, **kwargs):
        state = getattr(self, "_relibra", None)
        if state is None or self._relibra_plain:
            return super().forward(hidden, tokens_per_expert, probs, **kwargs)
        rt = state.runtime
        S = rt.topo.S
        m, rep = state.active
        if not _in_backward():  # a recompute inside the backward computes the same tokens again: not counted
            rt.executed.add(m, state.index, tokens_per_expert)
        tpe = tokens_per_expert.cpu() if torch.is_tensor(tokens_per_expert) else torch.as_tensor(tokens_per_expert)
        n_home = int(tpe[:S].sum())
        if rt.prefetch:  # the next layer to run: l+1 in the forward, l-1 in a recompute inside the backward
            rt.replicas.prefetch(m, state.index + (-1 if _in_backward() else 1))
        if state.grouped is not None:
            return _grouped_forward(self, super().forward, state, m, rep, hidden, tpe, probs, kwargs)
        out_home, bias = super().forward(hidden[:n_home], tpe[:S], probs[:n_home], **kwargs)
        plan = _sync_plan(rt, state, rep)
        if plan is None:  # no replica in this node for this (micro-batch, layer): nothing to join
            if rt.prefetch and out_home.requires_grad and state.index > 0:
                out_home = _PrefetchInBackward.apply(out_home, rt, m, state.index - 1)
            return out_home, bias
        owner = [p for names in state.param_names for p in (dict(self.named_parameters())[n] for n in names)]
        out_rep = _ReplicaExperts.apply(self, plan, m, tpe[S:].tolist(), hidden[n_home:], probs[n_home:], *owner)
        return torch.cat([out_home, out_rep.to(out_home.dtype)]), bias


_EXPERT_CLASSES: dict = {}


def _relibra_experts_class(cls):
    if issubclass(cls, _RelibraExpertsMixin):
        return cls
    if cls not in _EXPERT_CLASSES:
        _EXPERT_CLASSES[cls] = type("Relibra" + cls.__name__, (_RelibraExpertsMixin, cls), {})
    return _EXPERT_CLASSES[cls]


@dataclasses.dataclass
class _SyncPlan:
    """Who sends which expert to whom inside this rank's node for one (micro-batch, layer)."""

    send: list        # [(dest node-local index, replica slot k, local expert i)] in (dest, k) order
    recv: list        # [(src node-local index, replica slot k)] in (src, k) order
    send_splits: list  # experts sent to each node peer
    recv_splits: list  # experts received from each node peer
    slot_expert: list  # [R] logical expert of each of my replica slots (-1 empty)


def _sync_plan(rt: RelibraRuntime, state: _LayerState, rep: np.ndarray) -> _SyncPlan | None:
    t = rt.topo
    if t.R == 0:
        return None
    peers = list(rt.node_ranks[rt.node])
    if (rep[peers] < 0).all():
        return None
    home = invert_placement(rt.expert_at_home)[state.index]  # [E] home slot of each expert
    me = rt.ep_rank
    send, recv = [], []
    for j, r in enumerate(peers):
        for k in range(t.R):
            e = int(rep[r, k])
            if e < 0:
                continue
            owner = int(home[e]) // t.S
            if owner == me:
                send.append((j, k, int(home[e]) % t.S))
            if r == me:
                recv.append((peers.index(owner), k))
    recv.sort()
    send_splits = [sum(1 for s in send if s[0] == j) for j in range(len(peers))]
    recv_splits = [sum(1 for s in recv if s[0] == j) for j in range(len(peers))]
    return _SyncPlan(send, recv, send_splits, recv_splits, [int(e) for e in rep[me]])


def _a2a(rt: RelibraRuntime, send: torch.Tensor, send_splits, recv_splits, out: torch.Tensor, numel: int):
    dist.all_to_all_single(out, send, [s * numel for s in recv_splits], [s * numel for s in send_splits],
                           group=rt.node_group)


def _in_backward() -> bool:
    """True inside an autograd backward (e.g. a checkpointed layer's recompute), where layers run in reverse."""
    return torch._C._current_graph_task_id() != -1


class _ReplicaBuffers:
    """Double-buffered replica pool for send-ahead: layer l's replica weights live in buffer l % 2, so the next
    layer's can arrive while layer l computes. Each buffer remembers which (micro-batch, layer) it holds or is
    receiving. Transfers are point-to-point inside the node (owner's parameters -> holder's buffer, one message
    per parameter tensor, so the owner needs no send buffer). Every rank of a node makes the same sequence of
    calls with the same tags (the plan and the layer order are the same everywhere), so posted sends and
    receives match pairwise in order; a rank without replicas in a layer posts nothing for it and never
    waits, so no rank can hang on an empty slot."""

    def __init__(self, rt: RelibraRuntime):
        self.rt = rt
        self.bufs: list = [None, None]
        self.tags: list = [None, None]      # (m, l) held or arriving
        self.pending: list = [[], []]       # works of the transfer into (or out of) each buffer
        self.slots: list = [{}, {}]         # {replica slot k: flat weights} of the content
        self.ahead: list = [False, False]   # content requested before it was needed

    def _buffer(self, b: int, state) -> torch.Tensor:
        if self.bufs[b] is None:
            rt = self.rt
            first = next(state.layer.experts.parameters())
            numel = max(x.numel for x in rt.layers)  # one size for every layer: buffers are never reallocated
            self.bufs[b] = torch.empty(rt.topo.R * numel, dtype=first.dtype, device=first.device)
            rt.metrics.pool_bytes = sum(x.numel() * x.element_size() for x in self.bufs if x is not None)
        return self.bufs[b]

    def _wait(self, b: int) -> None:
        for w in self.pending[b]:
            w.wait()
        self.pending[b] = []

    def invalidate(self) -> None:
        """Forget the contents (weights may change: new plan, placement, optimizer step)."""
        for b in (0, 1):
            self._wait(b)
            self.tags[b], self.slots[b] = None, {}

    def prefetch(self, m: int, l: int) -> None:
        """Request layer l's replica weights for micro-batch m into buffer l % 2 (non-blocking)."""
        rt = self.rt
        if rt.topo.R == 0 or not 0 <= l < len(rt.layers) or rt.plan is None:
            return
        if not 0 <= m < rt.plan.num_micro_batches:
            return
        b = l % 2
        if self.tags[b] == (m, l):
            return
        self._wait(b)  # the previous content's transfer must be over before its buffer is reused
        state = rt.layers[l]
        plan = _sync_plan(rt, state, rt.plan.replica_expert[m, l])
        self.tags[b], self.slots[b], self.ahead[b] = (m, l), {}, True
        if plan is None:
            return
        params = dict(state.layer.experts.named_parameters())
        peers = [rt.global_ranks[r] for r in rt.node_ranks[rt.node]]
        ops = []
        for j, _, i in plan.send:  # (dest, k) order on the owner ...
            for n in state.param_names[i]:
                ops.append(dist.P2POp(dist.isend, params[n].detach(), peers[j], rt.node_group, tag=l))
        if plan.recv:
            buf = self._buffer(b, state)
            stride = buf.numel() // rt.topo.R
            for j, k in plan.recv:  # ... (source, k) order on the holder: same order per pair
                flat = buf[k * stride:k * stride + state.numel]
                off = 0
                for n in state.param_names[0]:
                    ops.append(dist.P2POp(dist.irecv, flat[off:off + params[n].numel()], peers[j], rt.node_group,
                                          tag=l))
                    off += params[n].numel()
                self.slots[b][k] = flat
                rt.metrics.replica_sync_bytes += flat.numel() * flat.element_size()
        # one batch: NCCL groups it (a pair sending to each other cannot deadlock), gloo posts each op
        works = dist.batch_isend_irecv(ops) if ops else []
        self.pending[b] = works

    def acquire(self, m: int, l: int) -> dict:
        """Layer l's replica weights for micro-batch m ({slot k: flat}); waits for their transfer."""
        b = l % 2
        held = self.tags[b] == (m, l)
        if not held:
            self.prefetch(m, l)
            self.ahead[b] = False
        metrics = self.rt.metrics
        if self.ahead[b]:
            metrics.fetches_ahead += 1
        elif held:
            metrics.fetches_reused += 1  # e.g. the backward of a layer whose forward weights are still here
        else:
            metrics.fetches_blocking += 1
        self.ahead[b] = False
        self._wait(b)
        return self.slots[b]


def _fetch(experts, plan: _SyncPlan) -> dict:
    """Receive replica weights from their owners into the shared pool. Returns {slot k: flat weights}."""
    state = experts._relibra
    rt = state.runtime
    params = dict(experts.named_parameters())
    first = params[state.param_names[0][0]]
    numel = state.numel
    flats = [torch.cat([params[n].detach().reshape(-1) for n in state.param_names[i]]) for i in
             sorted({i for _, _, i in plan.send})]
    idx = {i: j for j, i in enumerate(sorted({i for _, _, i in plan.send}))}
    send = (torch.cat([flats[idx[i]] for _, _, i in plan.send]) if plan.send
            else first.new_empty(0))
    pool = rt.pool(numel, first.dtype, first.device)
    out = pool[: len(plan.recv) * numel]
    _a2a(rt, send, plan.send_splits, plan.recv_splits, out, numel)
    rt.metrics.replica_sync_bytes += out.numel() * out.element_size()
    rt.metrics.peak_send_bytes = max(rt.metrics.peak_send_bytes, send.numel() * send.element_size())
    rt.metrics.fetches_blocking += 1
    return {k: out[j * numel:(j + 1) * numel] for j, (_, k) in enumerate(plan.recv)}


def _run_replicas(experts, flat_by_slot: dict, tpe_rep: list, hidden, probs):
    """Run replica slots through the experts module's own forward with swapped weights (functional call)."""
    state = experts._relibra
    S = state.runtime.topo.S
    params = dict(experts.named_parameters())
    active = [k for k in sorted(flat_by_slot)]
    assert sum(tpe_rep[k] for k in range(len(tpe_rep)) if k not in flat_by_slot) == 0, "tokens in empty slot"
    rows = np.cumsum([0] + list(tpe_rep))
    outs = []
    experts._relibra_plain = True
    try:
        for start in range(0, len(active), S):  # up to S replica slots per stock call
            chunk = active[start:start + S]
            swapped, counts = {}, []
            for i, k in enumerate(chunk):
                off = 0
                for n in state.param_names[i]:
                    p = params[n]
                    swapped[n] = flat_by_slot[k][off:off + p.numel()].view_as(p)
                    off += p.numel()
                counts.append(tpe_rep[k])
            lo, hi = int(rows[chunk[0]]), int(rows[chunk[-1] + 1])
            counts += [0] * (S - len(chunk))
            out, _ = torch.func.functional_call(
                experts, swapped, (hidden[lo:hi], torch.tensor(counts, dtype=torch.long), probs[lo:hi]),
                strict=False)
            outs.append(out)
    finally:
        experts._relibra_plain = False
    if not outs:
        return hidden.new_zeros((0, hidden.shape[-1]))
    return torch.cat(outs)


class _PrefetchInBackward(torch.autograd.Function):
    """Identity whose backward requests layer l's replica weights: the backward's send-ahead for layers whose
    node holds no replica (there, no `_ReplicaExperts` backward exists to issue it)."""

    @staticmethod
    def forward(ctx, x, rt, m, layer):
        ctx.rt, ctx.m, ctx.layer = rt, m, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.rt.replicas.prefetch(ctx.m, ctx.layer)
        return grad, None, None, None


class _ReplicaExperts(torch.autograd.Function):
    """Replica slots of one layer call. Inputs: the dispatched replica tokens (so every rank of the node
    runs the backward collective) and the owner's expert parameters (so replica gradients flow home)."""

    @staticmethod
    def forward(ctx, experts, plan, m, tpe_rep, hidden, probs, *owner_params):
        ctx.experts, ctx.plan, ctx.m, ctx.tpe_rep = experts, plan, m, tpe_rep
        ctx.save_for_backward(hidden, probs)
        state = experts._relibra
        flat = state.runtime.replicas.acquire(m, state.index) if state.runtime.prefetch else _fetch(experts, plan)
        with torch.no_grad():
            return _run_replicas(experts, flat, tpe_rep, hidden, probs)

    @staticmethod
    def backward(ctx, grad_out):
        experts, plan = ctx.experts, ctx.plan
        state = experts._relibra
        rt = state.runtime
        hidden, probs = ctx.saved_tensors
        rt._event("experts_backward", state.index)
        if rt.prefetch:
            rt.replicas.prefetch(ctx.m, state.index - 1)  # the backward's next layer, while this one computes
            flat = rt.replicas.acquire(ctx.m, state.index)
        else:
            flat = _fetch(experts, plan)  # the pool was reused by other layers: fetch again, recompute
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in flat.items()}
            h = hidden.detach().requires_grad_(hidden.requires_grad)
            p = probs.detach().requires_grad_(probs.requires_grad)
            out = _run_replicas(experts, leaves, ctx.tpe_rep, h, p)
            inputs = [h, p] + [leaves[k] for _, k in plan.recv]
            need = [x for x in inputs if x.requires_grad]
            if need and out.requires_grad:
                grads = torch.autograd.grad(out, need, grad_out.to(out.dtype), allow_unused=True)
            else:  # no replica weights here (all my slots empty): nothing flows, but still join the reduction
                grads = [None] * len(need)
        it = iter(grads)
        g = {id(x): (next(it) if x.requires_grad else None) for x in inputs}
        if g[id(h)] is None and hidden.requires_grad:
            g[id(h)] = torch.zeros_like(hidden)
        g_h, g_p = g[id(h)], g[id(p)]
        # replica holders -> owners, in flight until the owners' gradients are consumed (GradReturn)
        grads = {k: (g[id(leaves[k])] if g[id(leaves[k])] is not None else torch.zeros_like(leaves[k]))
                 for _, k in plan.recv}
        rt.grad_return.post(state, plan, grads)
        return (None, None, None, None, g_h, g_p, *([None] * (rt.topo.S * len(state.param_names[0]))))
