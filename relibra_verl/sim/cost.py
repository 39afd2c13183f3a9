"""Cost model: seconds per (micro-batch, MoE layer), forward and backward, from a strategy's plan output.

Shapes: M micro-batches, L MoE layers, G EP ranks. Inputs are the numpy fields of a planner
StrategyResult (relibra_verl.planner.strategies):
  rank_tokens [M, L, G]          routed (token, k) pairs computed on each rank
  traffic     [M, L, G_src, G_dst] pairs sent from a source rank to the computing rank (self included)
  replicas    [M, L, G]          replica experts whose weights each rank receives for one micro-batch
  redundant   [L, G]             redundant copies held for the whole batch (EPLB), or None
  moved_experts [L]              experts (EPLB: physical slots) whose content changed vs the previous batch

Terms (each vectorised over all (m, l); all ranks wait for the slowest one at every all-to-all):
  dispatch   2 all-to-alls (dispatch + combine) forward and 2 backward. Per rank, bytes = pairs * H *
             act_bytes, split into NVLink (same node, not self) and InfiniBand (other node); per direction
             the rank needs max(sent, received); NVLink and IB run concurrently:
             t = max_r max(nvl_bytes / nvlink_a2a, ib_bytes / ib_a2a) + a2a_latency.
             ib_forwarding = 1 models DeepEP-style NIC forwarding (see dispatch_time).
  expert     per rank: calls * a + b * pairs, calls = the copies (home experts, replicas, redundant) that
             compute at least one pair (`calls`; a copy without pairs runs no GEMM; without `calls`:
             S + replicas + redundant);
             a = expert weight bytes / HBM + call overhead, b = 6*H*I FLOPs / gemm rate (SwiGLU: 3 matmuls of
             2*H*I FLOPs per pair). Backward: bwd_compute_factor * (a, b). t = max over ranks.
  replica    per-micro-batch replicas (relibra): weight copy W = 3*H*I*weight_bytes before the layer's
             forward, again before its backward (replica buffers are a pool shared by layers), gradient
             reduce 3*H*I*grad_bytes after its backward, over NVLink at nvlink_p2p; busiest rank (receiver,
             or sender when `replica_sends` is known). Online planning (prefetch=False, UltraEP) pays these
             on the critical path. With the plan known ahead (prefetch=True) a copy overlaps the window
             before it (this layer's attention + the previous layer's experts; in backward the neighbour
             layer's experts + this layer's attention backward); the exposed time is
             max(t - window, 0) + replica_contention_share * min(t, window).
             Redundant copies held for the batch (EPLB): weights once per step and gradients once per step
             over NVLink (hierarchical EPLB replicates inside a node), on the critical path (`batch_overhead`).
  non_moe    attention + router + shared experts of the MoE layer on the rank's own tokens (the busiest
             source rank): (2 * params + score FLOPs(mean_context)) / dense rate; backward x factor.
  per micro-batch: dense layers and the LM head (same for every strategy).
  per batch: reordering migration, times migration_exposed_share: from the placements (migration_time:
             each changed slot receives the expert's state, over NVLink when its node held a copy, else IB;
             busiest rank), or without them ceil(sum(moved)/G) experts x 3*H*I x state_bytes over IB.
The planner's own time is not added: it runs ahead of the step on the CPU (reported separately).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from relibra_verl.sim.presets import ModelPreset
from relibra_verl.sim.profiles import HardwareProfile

TERMS = ("dispatch", "expert", "replica", "non_moe")


def expert_gemm_coeffs(model: ModelPreset, profile: HardwareProfile) -> tuple[float, float]:
    """Forward time of one expert GEMM call: a + b * pairs. Returns (a seconds, b seconds per pair).

    A measured fit in profile.gemm_fit[model.name] wins; otherwise a = 3*H*I*weight_bytes / hbm +
    gemm_call_overhead, b = 6*H*I / gemm_tflops.
    """
    fit = profile.gemm_fit.get(model.name)
    if fit:
        return float(fit["a_us"]) * 1e-6, float(fit["b_ns_per_token"]) * 1e-9
    a = model.expert_params * profile.weight_bytes_per_param / (profile.hbm_GBps * 1e9) + profile.gemm_call_overhead_us * 1e-6
    b = 2.0 * model.expert_params / (profile.gemm_tflops * 1e12)
    return a, b


def non_moe_flops_per_token(model: ModelPreset, mean_context: float) -> tuple[float, float]:
    """Forward FLOPs per token: (one MoE layer's non-expert part, the per-micro-batch rest: dense layers +
    LM head)."""
    score = model.attn_score_flops_per_token(mean_context)
    per_moe_layer = 2.0 * model.moe_layer_other_params() + score
    rest = model.num_dense_layers * (2.0 * model.dense_layer_params() + score) + 2.0 * model.hidden * model.vocab
    return per_moe_layer, rest


def _exposed(t: np.ndarray, window: np.ndarray, share: float) -> np.ndarray:
    """Critical-path part of a transfer of t seconds overlapped with a window: max(t-w, 0) + share*min(t, w)."""
    return np.maximum(t - window, 0.0) + share * np.minimum(t, window)


@dataclasses.dataclass
class BatchCost:
    """Seconds of one batch (all micro-batches). fwd/bwd: term -> [M, L]; extra terms scalar."""

    fwd: dict
    bwd: dict
    per_micro_batch_rest_s: float   # dense layers + LM head, summed over micro-batches (fwd + bwd)
    batch_overhead_s: float         # per-batch replica sync/reduce (EPLB-style redundant experts)
    migration_s: float              # reordering migration on the critical path
    plan_ms: float = 0.0
    initial_migration_s: float | None = None  # set when a run's first migration is kept out of the steady state

    @property
    def layer_time(self) -> np.ndarray:
        """[M, L] forward + backward seconds of each (micro-batch, MoE layer)."""
        return sum(self.fwd[t] + self.bwd[t] for t in TERMS)

    @property
    def total_s(self) -> float:
        return float(self.layer_time.sum()) + self.per_micro_batch_rest_s + self.batch_overhead_s + self.migration_s

    def breakdown(self) -> dict:
        """Seconds per term over the batch."""
        out = {t: float((self.fwd[t] + self.bwd[t]).sum()) for t in TERMS}
        out.update(dense_and_head=self.per_micro_batch_rest_s, batch_replicas=self.batch_overhead_s, migration=self.migration_s)
        return out


def dispatch_time(traffic: np.ndarray, node_of_rank: np.ndarray, model: ModelPreset, profile: HardwareProfile,
                  balanced: bool = False) -> np.ndarray:
    """One all-to-all (dispatch or combine): traffic [M, L, G, G] pairs -> [M, L] seconds (slowest rank).

    balanced: every rank receives the mean bytes; each source still sends what it sends (the sequence split
    over ranks is the data's, not the expert placement's), so this is a lower bound of the unbalanced time.

    profile.ib_forwarding = 0 (NCCL all-to-all, Megatron's alltoall dispatcher): a rank receives its
    inter-node bytes on its own NIC. = 1 (DeepEP-style): inter-node bytes land on the NIC of the same-index
    GPU of the destination node (each rank's NIC takes 1/g of its node's inter-node receive) and are
    forwarded over NVLink, which adds (g-1)/g of them to the NVLink bytes of the forwarders and receivers.
    """
    node = np.asarray(node_of_rank)
    same = node[:, None] == node[None, :]
    nvl_mask = same & ~np.eye(len(node), dtype=bool)
    ib_mask = ~same
    tr = np.asarray(traffic, dtype=np.float64)
    b = model.hidden * profile.act_bytes
    nvl_sent, nvl_recv = (tr * nvl_mask).sum(axis=3), (tr * nvl_mask).sum(axis=2)
    ib_sent, ib_recv = (tr * ib_mask).sum(axis=3), (tr * ib_mask).sum(axis=2)   # [M, L, G]
    if profile.ib_forwarding:
        N = int(node.max()) + 1
        g = len(node) // N
        onehot = (node[:, None] == np.arange(N)[None, :]).astype(np.float64)     # [G, N]
        nic = (ib_recv @ onehot / g) @ onehot.T                                  # node's receive / g, per rank
        fwd = (g - 1) / g
        nvl_sent = nvl_sent + fwd * nic
        nvl_recv = nvl_recv + fwd * ib_recv
        ib_recv = nic
    if balanced:  # expert placement decides where pairs are received, not how many each source sends
        nvl_recv = np.broadcast_to(nvl_recv.mean(axis=2, keepdims=True), nvl_recv.shape)
        ib_recv = np.broadcast_to(ib_recv.mean(axis=2, keepdims=True), ib_recv.shape)
    nvl = np.maximum(nvl_sent, nvl_recv) * b / (profile.nvlink_a2a_GBps * 1e9)
    ib = np.maximum(ib_sent, ib_recv) * b / (profile.ib_a2a_GBps * 1e9)
    return np.maximum(nvl, ib).max(axis=2) + profile.a2a_latency_us * 1e-6


def batch_cost(rank_tokens: np.ndarray, traffic: np.ndarray, replicas: np.ndarray, moved_experts: np.ndarray,
               node_of_rank, model: ModelPreset, profile: HardwareProfile, *, redundant: np.ndarray | None = None,
               prefetch: bool = True, mean_context: float = 1024.0,
               replica_sends: np.ndarray | None = None, plan_ms: float = 0.0, balanced: bool = False,
               calls: np.ndarray | None = None) -> BatchCost:
    """Cost of one batch.

    rank_tokens [M, L, G], traffic [M, L, G, G], replicas [M, L, G] (per micro-batch copies), moved_experts
    [L], node_of_rank [G]; redundant [L, G] copies held for the whole batch (EPLB); replica_sends [M, L, G]
    copies each rank sends, when known (else the receivers set the copy time). prefetch: per-micro-batch
    copies sent ahead (routing known) vs on the critical path (online planning). mean_context: mean
    attended positions per token (causal: about E[len^2] / (2 E[len]) over the batch's sequences).
    balanced: the idealised cost of the same work: every rank receives and computes the mean pairs (sources
    send as they do), S calls per rank, no replicas, redundant copies or migration (a lower bound of the
    unbalanced cost). calls [M, L, G]: GEMM calls of each rank (its copies that compute pairs), when
    known; else S + replicas + redundant.
    """
    rank_tokens = np.asarray(rank_tokens, dtype=np.float64)
    replicas = np.asarray(replicas, dtype=np.float64)
    M, L, G = rank_tokens.shape
    if np.shape(traffic) != (M, L, G, G) or replicas.shape != (M, L, G):
        raise ValueError(f"shapes: rank_tokens {rank_tokens.shape}, traffic {np.shape(traffic)}, replicas {replicas.shape}")
    S = model.num_experts // G
    f = profile.bwd_compute_factor
    P = model.expert_params

    # 1. dispatch + combine (the backward moves the same bytes the other way)
    a2a = dispatch_time(traffic, node_of_rank, model, profile, balanced)
    if balanced:
        replicas = np.zeros_like(replicas)
        redundant, replica_sends, moved_experts = None, None, np.zeros(L)
    fwd = {"dispatch": 2.0 * a2a}
    bwd = {"dispatch": 2.0 * a2a}

    # 2. expert GEMMs, slowest rank
    a, b = expert_gemm_coeffs(model, profile)
    red = np.zeros((L, G)) if redundant is None else np.asarray(redundant, dtype=np.float64)
    if balanced or calls is None:
        calls = S + replicas + red[None]
    else:
        calls = np.asarray(calls, dtype=np.float64)
        if calls.shape != (M, L, G):
            raise ValueError(f"shapes: calls {calls.shape}, expected {(M, L, G)}")
    per_rank = calls * a + rank_tokens * b
    fwd["expert"] = per_rank.mean(axis=2) if balanced else per_rank.max(axis=2)
    bwd["expert"] = f * fwd["expert"]

    # 3. non-MoE part of the layer on the busiest source rank's tokens
    src_tokens = np.asarray(traffic, dtype=np.float64).sum(axis=3) / model.topk
    busiest = src_tokens.max(axis=2)
    if not busiest.any():
        busiest = rank_tokens.sum(axis=2) / (model.topk * G)
    layer_flops, rest_flops = non_moe_flops_per_token(model, mean_context)
    dense_rate = profile.dense_tflops * 1e12
    fwd["non_moe"] = busiest * layer_flops / dense_rate
    bwd["non_moe"] = f * fwd["non_moe"]
    rest = float(busiest.max(axis=1).sum()) * rest_flops / dense_rate * (1.0 + f)

    # 4. replicas
    p2p = profile.nvlink_p2p_GBps * 1e9
    load = replicas if replica_sends is None else np.maximum(replicas, np.asarray(replica_sends, dtype=np.float64))
    busiest_copies = load.max(axis=2)  # [M, L]
    t_w = busiest_copies * P * profile.weight_bytes_per_param / p2p
    t_g = busiest_copies * P * profile.grad_bytes_per_param / p2p
    # all layers' redundant copies at once, busiest rank: weights before the batch, gradients after it
    batch_overhead = float(red.sum(axis=0).max() * P * (profile.weight_bytes_per_param + profile.grad_bytes_per_param) / p2p) if G else 0.0
    if prefetch:
        prev_expert = np.concatenate([np.zeros((M, 1)), fwd["expert"][:, :-1]], axis=1)
        next_expert = np.concatenate([bwd["expert"][:, 1:], np.zeros((M, 1))], axis=1)
        c = profile.replica_contention_share
        fwd["replica"] = _exposed(t_w, fwd["non_moe"] + prev_expert, c)
        bwd["replica"] = _exposed(t_w + t_g, bwd["non_moe"] + next_expert, c)
    else:
        fwd["replica"] = t_w
        bwd["replica"] = t_w + t_g

    # 5. reordering migration (once per batch)
    moved = float(np.asarray(moved_experts).sum())
    migration = np.ceil(moved / G) * P * profile.state_bytes_per_param / (profile.ib_bulk_GBps * 1e9) * profile.migration_exposed_share
    return BatchCost(fwd, bwd, rest, batch_overhead, float(migration), float(plan_ms))


def megatron_slots(num_layers: int, num_experts: int, ep_size: int, num_slots: int) -> np.ndarray:
    """[L, P] Megatron's layout in a slot space of P slots (P = E home slots, or G*(S+R) physical slots with
    the R spare slots of each rank empty, -1)."""
    S = num_experts // ep_size
    per = num_slots // ep_size
    row = np.full(num_slots, -1, dtype=np.int64)
    slots = (np.arange(ep_size)[:, None] * per + np.arange(S)[None, :]).reshape(-1)
    row[slots] = np.arange(num_experts)
    return np.tile(row, (num_layers, 1))


def migration_time(prev: np.ndarray, new: np.ndarray, node_of_rank, model: ModelPreset, profile: HardwareProfile) -> float:
    """Critical-path seconds to move from placement `prev` to `new` (both [L, P]: the expert in each slot, -1
    empty; rank of slot = slot // (P / G)). Every slot whose expert changed receives that expert's full state
    (3*H*I x state_bytes) from an old copy: over NVLink if the receiver's node held one, else over IB. All
    layers move at once; the busiest rank sets the time: max_r max(nvl_r / nvlink_p2p, ib_r / ib_bulk),
    times migration_exposed_share."""
    node = np.asarray(node_of_rank)
    G, N = len(node), int(node.max()) + 1
    new = np.asarray(new)
    L, P = new.shape
    prev = np.asarray(prev) if prev is not None and np.shape(prev) == new.shape else megatron_slots(L, model.num_experts, G, P)
    changed = (new != prev) & (new >= 0)
    if not changed.any():
        return 0.0
    per = P // G
    slot_node = node[np.arange(P) // per]                                    # [P]
    held = np.zeros((L, model.num_experts + 1, N), dtype=bool)              # expert e held on node n before
    l_i, s_i = np.nonzero(prev >= 0)
    held[l_i, prev[l_i, s_i], slot_node[s_i]] = True
    l_c, s_c = np.nonzero(changed)
    local = held[l_c, new[l_c, s_c], slot_node[s_c]]
    rank = s_c // per
    nvl = np.bincount(rank[local], minlength=G)
    ib = np.bincount(rank[~local], minlength=G)
    b = model.expert_params * profile.state_bytes_per_param
    t = np.maximum(nvl * b / (profile.nvlink_p2p_GBps * 1e9), ib * b / (profile.ib_bulk_GBps * 1e9))
    return float(t.max() * profile.migration_exposed_share)


def result_cost(result, node_of_rank, model: ModelPreset, profile: HardwareProfile, *,
                prefetch: bool = True, mean_context: float = 1024.0, prev_placement: np.ndarray | None = None) -> BatchCost:
    """batch_cost of a planner StrategyResult (duck-typed: rank_tokens, traffic, replicas, moved_experts,
    plan_ms; optional redundant [L, G], replica_sends [M, L, G], placement [L, P], calls [M, L, G]). With a `placement`, the
    migration term is migration_time(prev_placement or Megatron's layout, placement) instead of the
    moved_experts estimate."""
    cost = batch_cost(result.rank_tokens, result.traffic, result.replicas, result.moved_experts, node_of_rank,
                      model, profile, redundant=getattr(result, "redundant", None), prefetch=prefetch, mean_context=mean_context,
                      replica_sends=getattr(result, "replica_sends", None), plan_ms=float(getattr(result, "plan_ms", 0.0) or 0.0),
                      calls=getattr(result, "calls", None))
    placement = getattr(result, "placement", None)
    if placement is not None:
        cost.migration_s = migration_time(prev_placement, placement, node_of_rank, model, profile)
    return cost
