"""A small real Megatron MoE layer on gloo ranks, with replayed routing: shared by tests and `verify`.

Functions run inside a rank process (see `launch.spawn_ranks`). `compare_layer` runs one forward+backward of
the stock layer, then patches the *same* layer in place (same weights, same RouterReplay instance) and runs
again under a plan, and returns the differences of output, input grad, router grad and every expert
weight grad (max abs / max rel over this rank's tensors).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from relibra_verl.runtime import cpu_compat

_MEGATRON_READY = False


def init_megatron(ep_size: int, seed: int = 1234) -> None:
    """Model-parallel state with EP = ep_size (TP = PP = 1); CPU adaptations applied when no CUDA."""
    global _MEGATRON_READY
    if _MEGATRON_READY:
        return
    cpu_compat.apply()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep_size)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    _MEGATRON_READY = True


def build_moe_layer(num_experts: int, topk: int, hidden: int = 16, ffn: int = 8,
                    dtype: torch.dtype = torch.float32, seed: int = 0, experts: str = "sequential", **overrides):
    """A Megatron MoELayer (alltoall dispatcher, routing replay on) with `experts`: "sequential" (local spec ->
    SequentialMLP) or "grouped" (Megatron's TEGroupedMLP over relibra's torch grouped linear with TE's
    interface, `moe_grouped_gemm=True`). Expert weights are a function of the global expert id only, the same
    for both kinds, so the two layers compute the same function."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=1, hidden_size=hidden, num_attention_heads=1, num_moe_experts=num_experts,
              moe_router_topk=topk, moe_ffn_hidden_size=ffn, ffn_hidden_size=ffn,
              moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
              moe_aux_loss_coeff=0.0, moe_enable_routing_replay=True, use_cpu_initialization=True,
              add_bias_linear=False, params_dtype=dtype, bf16=dtype == torch.bfloat16,
              expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
              moe_router_dtype="fp32")
    if experts not in ("sequential", "grouped"):
        raise ValueError(f"experts must be sequential or grouped, got {experts!r}")
    kw["moe_grouped_gemm"] = experts == "grouped"
    kw.update(overrides)
    config = TransformerConfig(**kw)
    torch.manual_seed(seed)
    if experts == "grouped":
        from relibra_verl.runtime.grouped_linear import grouped_moe_spec

        spec = grouped_moe_spec()
    else:
        spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
    layer = spec(config=config, layer_number=1)
    # same router on every rank (it is data-parallel in Megatron)
    with torch.no_grad():
        for p in layer.router.parameters():
            dist.broadcast(p.data, src=0)
        # Megatron's CPU init gives every EP rank the same expert weights; make each expert distinct and a
        # function of its global id only, so a token sent to a wrong expert shows up as a difference
        S = layer.num_local_experts
        first = parallel_state.get_expert_model_parallel_rank() * S
        for i in range(S):
            gen = torch.Generator().manual_seed(seed * 100003 + first + i)
            for p in expert_params(layer.experts, i):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return layer.to(dtype)


def expert_params(experts, i: int) -> list:
    """Local expert i's parameters in a fixed order (fc1 then fc2, weight then bias) for either kind."""
    if hasattr(experts, "local_experts"):
        return list(experts.local_experts[i].parameters())
    out = []
    for lin in (experts.linear_fc1, experts.linear_fc2):
        out += [getattr(lin, f"{kind}{i}") for kind in ("weight", "bias") if hasattr(lin, f"{kind}{i}")]
    return out


def replay(layer, topk_ids: torch.Tensor) -> None:
    """Force this layer's routing (Megatron RouterReplay, REPLAY_FORWARD) to topk_ids [T, K]."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    rr = layer.router.router_replay
    rr.clear_indices()
    rr.set_target_indices(topk_ids.long())
    rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def fwd_bwd(layer, x: torch.Tensor, topk_ids: torch.Tensor, w: torch.Tensor) -> dict:
    """One forward+backward with replayed routing; returns output and every gradient (cloned)."""
    for p in layer.parameters():
        p.grad = None
    replay(layer, topk_ids)
    x = x.detach().clone().requires_grad_()
    out, _ = layer(x)
    (out.float() * w).sum().backward()
    res = {"output": out.detach().clone(), "input_grad": x.grad.detach().clone()}
    for n, p in layer.named_parameters():
        g = p.main_grad if hasattr(p, "main_grad") else p.grad
        res[("router_grad:" if n.startswith("router") else "expert_grad:") + n] = (
            torch.zeros_like(p) if g is None else g.detach().clone())
    return res


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs diff, max rel diff) of b against reference a; rel = abs diff / max |a| (abs diff when a is 0).

    A NaN or Inf in either tensor makes both inf: not exact under any tolerance, even where both hold the same
    NaN (`max(0.0, nan)` is 0.0 in Python, so a NaN must never reach a max as a number)."""
    x, y = a.float(), b.float()
    if x.shape != y.shape:
        raise ValueError(f"compared tensors differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        return float("inf"), float("inf")
    if not x.numel():
        return 0.0, 0.0
    ad = (x - y).abs().max().item()
    scale = x.abs().max().item()
    return ad, (ad / scale if scale > 0 else ad)


def diffs(a: dict, b: dict) -> dict:
    """{name: (max abs diff, max rel diff)} over a's names (see `diff`: non-finite values give inf)."""
    return {k: diff(a[k], b[k]) for k in a}


def max_rel(pairs) -> float:
    """Largest relative difference over (reference, result) tensor pairs; inf if any holds a NaN or Inf."""
    return max((diff(a, b)[1] for a, b in pairs), default=0.0)


def random_plan(topo, counts: np.ndarray, rng: np.random.Generator, num_layers: int = 1,
                expert_at_home: np.ndarray | None = None):
    """A random legal BatchPlan for counts [M, L, G, E] (tests; any quotas are legal, even too large)."""
    from relibra_verl.planner.types import BatchPlan, identity_placement, invert_placement

    M, L = counts.shape[0], counts.shape[1]
    eah = identity_placement(topo, L) if expert_at_home is None else expert_at_home
    rep = np.full((M, L, topo.G, topo.R), -1, dtype=np.int64)
    quota = np.zeros((M, L, topo.G, topo.R, topo.G), dtype=np.int64)
    nodes = np.asarray(topo.node_of_rank)
    home_rank = invert_placement(eah) // topo.S
    for m in range(M):
        for l in range(L):
            for r in range(topo.G):
                cands = [e for e in range(topo.E) if nodes[home_rank[l, e]] == nodes[r] and home_rank[l, e] != r]
                rng.shuffle(cands)
                for k in range(topo.R):
                    if not cands or rng.random() < 0.2:
                        continue
                    e = cands.pop()
                    rep[m, l, r, k] = e
                    quota[m, l, r, k] = rng.integers(0, counts[m, l, :, e] + 2)
    return BatchPlan(topo=topo, expert_at_home=eah, replica_expert=rep, replica_quota=quota,
                     moved_experts=np.zeros(L, dtype=np.int64))


def tokens_per_rank(topo, plan, topk_ids_by_rank, layer: int = 0, m: int = 0):
    """Pairs computed on each rank [G] under `plan` (None: Megatron's static placement).

    topk_ids_by_rank: G tensors [T_r, K] of routed experts held by each source rank."""
    import torch as _t

    from relibra_verl.runtime.slots import physical_routing

    G, S, R = topo.G, topo.S, topo.R
    load = np.zeros(G, dtype=np.int64)
    for r, ids in enumerate(topk_ids_by_rank):
        if plan is None:
            np.add.at(load, ids.reshape(-1).numpy() // S, 1)
            continue
        cs, q = plan.copy_tables(m, layer, r)
        rmap = _t.zeros((ids.shape[0], topo.E), dtype=_t.bool)
        rmap.scatter_(1, ids.long(), True)
        phys, _ = physical_routing(rmap, rmap.float(), _t.from_numpy(cs), _t.from_numpy(q), G * (S + R),
                                   kernels="torch")
        load += phys.reshape(phys.shape[0], G, S + R).sum(dim=(0, 2)).numpy()
    return load
