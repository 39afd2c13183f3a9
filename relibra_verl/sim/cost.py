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
             Redundant copies held for the whole batch (EPLB): their placement is known before the step,
             so they are sent ahead like relibra's copies, and their dedicated memory (one buffer per layer)
             lets every layer's copies stream from the step's start: weights during micro-batch 0's
             forward, gradients (accumulated over the micro-batches) reduced beside the last micro-batch's
             backward; only what the compute cannot hide plus the contention share is paid
             (_redundant_sync, `redundant_sync`). A copy travels over NVLink inside a node (nvlink_p2p),
             over InfiniBand across (ib_bulk); the receivers set the time, as for relibra's replicas
             (copies of one expert to several ranks go as a pipelined broadcast; redundant_copy_seconds).
  non_moe    attention + router + shared experts of the MoE layer on the rank's own tokens (the busiest
             source rank): (2 * params + score FLOPs(mean_context)) / dense rate; backward x factor.
  per micro-batch: dense layers and the LM head (same for every strategy).
  per batch: reordering migration, times migration_exposed_share: from the placements (migration_time:
             each home slot whose expert changed receives the expert's optimizer state, 3*H*I x
             state_bytes, from its old home: over NVLink inside a node, else IB; busiest rank), or without
             them ceil(sum(moved)/G) experts x 3*H*I x state_bytes over IB. An EPLB redundant slot holds no
             optimizer state and its weights are refreshed every step anyway (the replica term), so a change
             there costs no migration.
  runtime:   what the balancing runtime itself pays per step (relibra_verl.sim.overheads): relibra's loads
             all-gather, plan agreement and plan install; EPLB's loads all-reduce and placement install.
The planners' own CPU time is not added (reported separately as plan_ms): the trainer plans the placement
and all but the first micro-batch's replicas beside the compute.

The ideal (balanced=True, and relibra_verl.sim.report.ideal_costs) is a lower bound by construction: each
term is at most the same term of the strategy whose work it balances (dispatch: each rank's receive set to
the mean, its send as it is; expert: the ranks' GEMM calls and pairs spread evenly, (sum calls * a +
pairs * b) / G <= the busiest rank's; no replica, copy, migration or runtime cost), and the ideal takes the
least over the strategies, so no strategy's step time is below it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from relibra_verl.planner.hardware import HardwareProfile, expert_gemm_coeffs, non_moe_flops_per_token  # noqa: F401
from relibra_verl.sim.presets import ModelPreset

TERMS = ("dispatch", "expert", "replica", "non_moe")


def _exposed(t: np.ndarray, window: np.ndarray, share: float) -> np.ndarray:
    """Critical-path part of a transfer of t seconds overlapped with a window: max(t-w, 0) + share*min(t, w)."""
    return np.maximum(t - window, 0.0) + share * np.minimum(t, window)


@dataclasses.dataclass
class BatchCost:
    """Seconds of one batch (all micro-batches). fwd/bwd: term -> [M, L]; extra terms scalar."""

    fwd: dict
    bwd: dict
    per_micro_batch_rest_s: float   # dense layers + LM head, summed over micro-batches (fwd + bwd)
    redundant_sync_s: float         # exposed per-step sync of redundant copies held for the batch (EPLB)
    migration_s: float              # reordering migration on the critical path
    plan_ms: float = 0.0
    runtime_s: float = 0.0          # the balancing runtime's own per-step costs (relibra_verl.sim.overheads)
    initial_migration_s: float | None = None  # set when a run's first migration is kept out of the steady state

    @property
    def layer_time(self) -> np.ndarray:
        """[M, L] forward + backward seconds of each (micro-batch, MoE layer)."""
        return sum(self.fwd[t] + self.bwd[t] for t in TERMS)

    @property
    def total_s(self) -> float:
        return (float(self.layer_time.sum()) + self.per_micro_batch_rest_s + self.redundant_sync_s + self.migration_s
                + self.runtime_s)

    def breakdown(self) -> dict:
        """Seconds per term over the batch."""
        out = {t: float((self.fwd[t] + self.bwd[t]).sum()) for t in TERMS}
        out.update(dense_and_head=self.per_micro_batch_rest_s, redundant_sync=self.redundant_sync_s,
                   migration=self.migration_s, runtime=self.runtime_s)
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
               calls: np.ndarray | None = None, redundant_copy_s: np.ndarray | None = None) -> BatchCost:
    """Cost of one batch.

    rank_tokens [M, L, G], traffic [M, L, G, G], replicas [M, L, G] (per micro-batch copies), moved_experts
    [L], node_of_rank [G]; redundant [L, G] copies held for the whole batch (EPLB); replica_sends [M, L, G]
    copies each rank sends, when known (else the receivers set the copy time). prefetch: per-micro-batch
    copies sent ahead (routing known) vs on the critical path (online planning). mean_context: mean
    attended positions per token (causal: about E[len^2] / (2 E[len]) over the batch's sequences).
    balanced: the idealised cost of the same work: every rank receives the mean pairs (sources send as
    they do) and computes the mean of the ranks' GEMM work (calls and pairs), no replicas, redundant
    copies or migration (a lower bound of the unbalanced cost). calls [M, L, G]: GEMM calls of each rank
    (its copies that compute pairs), when known; else S + replicas + redundant.
    redundant_copy_s [L]: seconds of the busiest rank's redundant-copy transfers of each layer at one byte
    per parameter (redundant_copy_seconds); without it, the busiest receiver's copies over NVLink.
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
        redundant, replica_sends, moved_experts, redundant_copy_s = None, None, np.zeros(L), None
    fwd = {"dispatch": 2.0 * a2a}
    bwd = {"dispatch": 2.0 * a2a}

    # 2. expert GEMMs, slowest rank
    a, b = expert_gemm_coeffs(model, profile)
    red = np.zeros((L, G)) if redundant is None else np.asarray(redundant, dtype=np.float64)
    if calls is None:
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
    if prefetch:
        prev_expert = np.concatenate([np.zeros((M, 1)), fwd["expert"][:, :-1]], axis=1)
        next_expert = np.concatenate([bwd["expert"][:, 1:], np.zeros((M, 1))], axis=1)
        c = profile.replica_contention_share
        fwd["replica"] = _exposed(t_w, fwd["non_moe"] + prev_expert, c)
        bwd["replica"] = _exposed(t_w + t_g, bwd["non_moe"] + next_expert, c)
    else:
        fwd["replica"] = t_w
        bwd["replica"] = t_w + t_g
    if redundant_copy_s is None:
        redundant_copy_s = red.max(axis=1) * P / p2p if G else np.zeros(L)
    redundant_sync = _redundant_sync(np.asarray(redundant_copy_s, dtype=np.float64), fwd, bwd, profile)

    # 5. reordering migration (once per batch)
    moved = float(np.asarray(moved_experts).sum())
    migration = np.ceil(moved / G) * P * profile.state_bytes_per_param / (profile.ib_bulk_GBps * 1e9) * profile.migration_exposed_share
    return BatchCost(fwd, bwd, rest, redundant_sync, float(migration), float(plan_ms))


def _redundant_sync(copy_s: np.ndarray, fwd: dict, bwd: dict, profile: HardwareProfile) -> float:
    """Exposed seconds of one step's redundant-copy sync (EPLB), copy_s [L] per byte per parameter.

    Weights: every layer's copies are issued in layer order when the step starts and stream while micro-batch
    0's forward runs; layer l's experts wait for its copies: the forward is delayed by
    max(0, max_l(C_l - W_l)), C_l the copies' time up to layer l, W_l micro-batch 0's forward before
    layer l's experts (earlier MoE layers and this layer's attention). Gradients: each layer's reduce is
    issued after its last backward (micro-batch M-1; layers L-1 first) and streams beside the remaining
    backward: the reduces of layers l..0 cannot end before layer l's backward ends plus their own time,
    so the tail left after the backward is max(0, max_l(D_l - B_l)), D_l the reduces of layers 0..l,
    B_l the backward of the layers below l. Plus the contention share of everything overlapped."""
    if not copy_s.any():
        return 0.0
    t_w = copy_s * profile.weight_bytes_per_param
    t_g = copy_s * profile.grad_bytes_per_param
    layer_f = sum(fwd[t][0] for t in ("dispatch", "expert", "non_moe", "replica"))            # [L], micro-batch 0
    layer_b = sum(bwd[t][-1] for t in ("dispatch", "expert", "non_moe", "replica"))           # [L], micro-batch M-1
    before = np.concatenate([[0.0], np.cumsum(layer_f)[:-1]]) + fwd["non_moe"][0]
    w_delay = max(0.0, float((np.cumsum(t_w) - before).max()))
    below = np.concatenate([[0.0], np.cumsum(layer_b)[:-1]])                                   # backward of layers < l
    g_tail = max(0.0, float((np.cumsum(t_g) - below).max()))
    c = profile.replica_contention_share
    return w_delay + g_tail + c * (float(t_w.sum()) - w_delay + float(t_g.sum()) - g_tail)


def megatron_slots(num_layers: int, num_experts: int, ep_size: int, num_slots: int) -> np.ndarray:
    """[L, P] Megatron's layout in a slot space of P slots (P = E home slots, or G*(S+R) physical slots with
    the R spare slots of each rank empty, -1)."""
    S = num_experts // ep_size
    per = num_slots // ep_size
    row = np.full(num_slots, -1, dtype=np.int64)
    slots = (np.arange(ep_size)[:, None] * per + np.arange(S)[None, :]).reshape(-1)
    row[slots] = np.arange(num_experts)
    return np.tile(row, (num_layers, 1))


def redundant_copy_seconds(placement: np.ndarray, node_of_rank, model: ModelPreset, profile: HardwareProfile) -> np.ndarray:
    """[L] seconds, per byte per parameter, of each layer's redundant-copy transfers (EPLB): every
    redundant slot (encoded -(e + 2), relibra_verl.planner.baselines) exchanges 3*H*I parameters with
    its expert's home slot, over NVLink inside a node (nvlink_p2p), over InfiniBand across (ib_bulk).
    profile.eplb_copies_over_nvlink = 1 prices every copy at NVLink (a bound that favours EPLB).
    Per rank its receives on each link (copies of one expert to several ranks go as a pipelined broadcast,
    so no sender carries more than it receives, as for relibra's replicas); the links run concurrently;
    the busiest rank sets the time. Multiply by weight_bytes_per_param (the copies) or grad_bytes_per_param (the
    gradient reduce)."""
    node = np.asarray(node_of_rank)
    placement = np.asarray(placement)
    L, P = placement.shape
    G = len(node)
    per = P // G
    home = np.full((L, model.num_experts), -1, dtype=np.int64)
    l_h, p_h = np.nonzero(placement >= 0)
    home[l_h, placement[l_h, p_h]] = p_h
    l_r, p_r = np.nonzero(placement <= -2)
    dst = p_r // per
    src = home[l_r, -placement[l_r, p_r] - 2] // per
    cross = (node[src] != node[dst]) & (profile.eplb_copies_over_nvlink == 0)
    t = np.zeros((L, G))
    for mask, GBps in ((~cross, profile.nvlink_p2p_GBps), (cross, profile.ib_bulk_GBps)):
        recv = np.zeros((L, G))
        np.add.at(recv, (l_r[mask], dst[mask]), 1.0)
        t = np.maximum(t, recv * model.expert_params / (GBps * 1e9))
    return t.max(axis=1)


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
    moved_experts estimate; an EPLB placement (redundant slots encoded, relibra_verl.planner.baselines) also
    gives its redundant copies' links (redundant_copy_seconds)."""
    placement = getattr(result, "placement", None)
    redundant = getattr(result, "redundant", None)
    copy_s = None
    if placement is not None and redundant is not None and np.any(redundant) and (np.asarray(placement) <= -2).any():
        copy_s = redundant_copy_seconds(placement, node_of_rank, model, profile)
    cost = batch_cost(result.rank_tokens, result.traffic, result.replicas, result.moved_experts, node_of_rank,
                      model, profile, redundant=redundant, prefetch=prefetch, mean_context=mean_context,
                      replica_sends=getattr(result, "replica_sends", None), plan_ms=float(getattr(result, "plan_ms", 0.0) or 0.0),
                      calls=getattr(result, "calls", None), redundant_copy_s=copy_s)
    if placement is not None:
        cost.migration_s = migration_time(prev_placement, placement, node_of_rank, model, profile)
    return cost
