"""Observation points of the end-to-end run (loaded in every process through VERL_USE_EXTERNAL_MODULES).

One thing here changes what is sampled, so that the relibra-on and -off runs can be compared token by
token: every rollout request gets its own sampling seed, a function of (training step, sample index,
response index, validation or not). Without it vLLM draws from one generator per engine in whatever
order requests are batched, so two runs sample different tokens from the same weights. (verl's own
`rollout.full_determinism` gives every request of a replica the same seed, so GRPO's n responses to a
prompt would all be equal.) Nothing else changes what verl, vLLM or relibra compute; the rest records,
as JSON lines under $RELIBRA_E2E_PROBE_DIR (one file per process):
  * `routes`: what vLLM returned for the first requests (Python type, dtype, shape of
    `routed_experts`, prompt and response lengths), seen where verl's agent loop receives it;
  * `sample`: every rollout's prompt and generated token ids (training and validation), to compare the
    tokens of the relibra-on and -off runs;
  * `export`: a fingerprint of every tensor the actor sends to vLLM, per weight sync
    (RELIBRA_E2E_FAULT=swap_experts makes the export non-canonical on purpose, to see the checks fail);
  * `log_probs`: the response tokens' log-probs a forward-only pass returned (the actor's old log-probs and
    the reference model's; the positions verl keeps), per rank and call, to compare the relibra-on and -off
    runs;
  * `replay_mismatch`: on the actor's first batch, before verl's first log-prob pass, one extra forward
    pass in which verl hands the rollout's routes to the routers (set_router_replay_data, R3 mask) but the
    routers keep their own top-k; per MoE layer, how many replayable (token, layer) rows chose other
    experts than vLLM did. relibra is detached for that pass (it is outside training).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time

from relibra_verl.patches import _after_import as after_import

_lock = threading.Lock()
_ROUTE_SAMPLES = 4
_state = {"routes": 0, "mismatch_done": False}


def record(kind: str, **fields) -> None:
    out_dir = os.environ.get("RELIBRA_E2E_PROBE_DIR")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    line = json.dumps({"kind": kind, "pid": os.getpid(), "time": time.time(), **fields})
    with _lock, open(os.path.join(out_dir, f"{os.getpid()}.jsonl"), "a") as f:
        f.write(line + "\n")


def _classes(cls) -> list:
    """The class, and where the module exposes it as a Ray actor class (@ray.remote) also the class Ray
    made of it, which holds its own copies of the methods."""
    meta = getattr(cls, "__ray_metadata__", None)
    return [cls] if meta is None else [meta.modified_class.__mro__[1], meta.modified_class]


# ------------------------------------------------------------------------------ a seed per rollout request
def request_seed(trajectory: dict, session_id: int) -> int:
    key = f"{trajectory['step']}/{trajectory['sample_index']}/{session_id}/{bool(trajectory['validate'])}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def _patch_agent_loop_seed(actor_cls) -> None:
    for cls in _classes(actor_cls):
        _seed_requests(cls)


def _seed_requests(cls) -> None:
    orig = cls._run_agent_loop

    @functools.wraps(orig)
    async def _run_agent_loop(self, sampling_params, trajectory, **kwargs):
        seeded = dict(sampling_params, seed=request_seed(trajectory, int(kwargs.get("session_id", 0))))
        return await orig(self, seeded, trajectory, **kwargs)

    cls._run_agent_loop = _run_agent_loop


# ------------------------------------------------------------------------------------ routes as vLLM sent them
def _patch_agent_loop(actor_cls) -> None:
    for cls in _classes(actor_cls):
        _record_outputs(cls)


def _record_outputs(cls) -> None:
    orig = cls._agent_loop_postprocess

    @functools.wraps(orig)
    async def _agent_loop_postprocess(self, output, validate, **kwargs):
        for out in output if isinstance(output, list) else [output]:
            routes = getattr(out, "routed_experts", None)
            if _state["routes"] < _ROUTE_SAMPLES:
                _state["routes"] += 1
                record("routes", validate=bool(validate), type=type(routes).__name__,
                       dtype=None if routes is None else str(routes.dtype),
                       shape=None if routes is None else [int(s) for s in routes.shape],
                       prompt_len=len(out.prompt_ids), response_len=len(out.response_ids))
            record("sample", validate=bool(validate), prompt_ids=[int(t) for t in out.prompt_ids],
                   response_ids=[int(t) for t in out.response_ids],
                   route_rows=None if routes is None else int(routes.shape[0]))
        return await orig(self, output, validate, **kwargs)

    cls._agent_loop_postprocess = _agent_loop_postprocess


# ------------------------------------------------------------------------- the routers' own choice vs vLLM's
def _patch_engine_base(mod) -> None:
    cls = mod.BaseEngine
    orig = cls.infer_batch

    @functools.wraps(orig)
    def infer_batch(self, data, loss_function=None):
        if not _state["mismatch_done"] and type(self).__name__.startswith("MegatronEngine"):
            _state["mismatch_done"] = True  # the actor's first forward pass: old log-probs of batch 1
            try:
                record("replay_mismatch", **replay_mismatch(self, data, loss_function, orig))
            except Exception as exc:  # recorded; the run's checks then fail on the missing figure
                record("replay_mismatch", error=f"{type(exc).__name__}: {exc}")
        out = orig(self, data, loss_function)
        _record_log_probs(self, data, out)
        return out

    cls.infer_batch = infer_batch


def _record_log_probs(engine, data, out) -> None:
    """The response tokens' log-probs a forward-only pass returned on this rank (the actor's old log-probs,
    or the reference model's: verl builds the ref engine forward_only), in the order verl returns them."""
    try:
        import torch.distributed as dist

        lp = out.get("model_output", {}).get("log_probs") if isinstance(out, dict) else None
        if lp is None:
            return
        import torch
        from verl.workers.utils.padding import no_padding_2_padding

        kind = "ref" if getattr(engine.engine_config, "forward_only", False) else "logprob"
        n = _state[kind] = _state.get(kind, 0) + 1
        # what verl keeps: each response token's log-prob (verl's own slicing, no_padding_2_padding)
        padded = no_padding_2_padding(lp, data).float().cpu()
        lens = data["responses"].offsets().diff().tolist()
        response = torch.cat([padded[i, :k] for i, k in enumerate(lens)]).tolist()
        record("log_probs", pass_name=kind, call=n, rank=dist.get_rank() if dist.is_initialized() else 0,
               values=[round(v, 6) for v in response], all_positions=lp.values().numel())
    except Exception as exc:  # recorded; the check then fails on the missing figures
        record("log_probs", error=f"{type(exc).__name__}: {exc}")


def replay_mismatch(engine, data, loss_function, infer_batch) -> dict:
    """One forward pass over `data` in which verl hands the rollout's routes to the routers as usual
    (set_router_replay_data, R3 mask) but each router keeps its own top-k; where verl would substitute
    the replayed experts (RouterReplay.get_replay_topk, aligned by verl), the two are compared as sets on
    the rows R3 replays, per MoE layer."""
    import torch
    import torch.distributed as dist
    from verl.utils import tensordict_utils as tu
    from verl.utils.megatron.router_replay_patch import RouterReplay, RouterReplayAction

    per_layer: dict[int, list[int]] = {}
    replay_topk = RouterReplay.get_replay_topk

    def own_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, native = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD and self.target_topk_idx is not None:
            target = self.target_topk_idx.to(native.device).long()
            rows = (torch.ones(native.shape[0], dtype=torch.bool) if self.target_replay_mask is None
                    else self.target_replay_mask.bool().to(native.device))
            differs = (native.sort(-1).values != target.sort(-1).values).any(-1)
            n = per_layer.setdefault(RouterReplay.router_instances.index(self), [0, 0])
            n[0] += int(rows.sum())
            n[1] += int(differs[rows].sum())
        return probs, native

    relibra = getattr(engine, "_relibra", None)
    RouterReplay.get_replay_topk = own_topk
    engine._relibra = None
    try:
        probe = data.clone()
        tu.assign_non_tensor_data(probe, "enable_routing_replay", True)
        infer_batch(engine, probe, loss_function)
    finally:
        RouterReplay.get_replay_topk = replay_topk
        engine._relibra = relibra
        RouterReplay.clear_global_indices()
        RouterReplay.clear_global_router_replay_action()
    rows = sum(v[0] for v in per_layer.values())
    wrong = sum(v[1] for v in per_layer.values())
    return {"rank": dist.get_rank() if dist.is_initialized() else 0, "rows": rows, "mismatch_rows": wrong,
            "by_layer": {str(k): {"rows": v[0], "mismatch_rows": v[1]} for k, v in sorted(per_layer.items())}}


# ------------------------------------------------------------------- what the actor sends to vLLM, per tensor
def _patch_weight_export(mod) -> None:
    """Fingerprint every tensor of each weight export to the rollout (verl's get_per_tensor_param, after
    relibra's canonical-order wrapper): float64 sum, sum of squares and a position-weighted sum. The run's
    check matches each expert's fingerprint against the relibra-off run's: canonical order means every
    expert's closest match there is the expert with its own name."""
    cls = mod.MegatronEngine
    orig = cls.get_per_tensor_param
    count = {"exports": 0}

    @functools.wraps(orig)
    def get_per_tensor_param(self, *args, **kwargs):
        gen, extra = orig(self, *args, **kwargs)
        count["exports"] += 1
        export = count["exports"]

        def fingerprinted():
            import torch
            import torch.distributed as dist

            prints = {}
            for name, tensor in gen:
                name = _swapped(name) if os.environ.get("RELIBRA_E2E_FAULT") == "swap_experts" else name
                t = tensor.detach().double().flatten().cpu()
                w = torch.arange(1, t.numel() + 1, dtype=torch.float64) / t.numel()
                prints[name] = [float(t.sum()), float((t * t).sum()), float((t * w).sum())]
                yield name, tensor
            if not dist.is_initialized() or dist.get_rank() == 0:
                record("export", export=export, fingerprints=prints)
        return fingerprinted(), extra

    cls.get_per_tensor_param = get_per_tensor_param


def _swapped(name: str) -> str:
    """Fault injection for checking the checks (RELIBRA_E2E_FAULT=swap_experts): experts 0 and 1 of every
    layer exchange names in the export, as a non-canonical export would."""
    for a, b in ((".mlp.experts.0.", ".mlp.experts.1."), (".mlp.experts.1.", ".mlp.experts.0.")):
        if a in name:
            return name.replace(a, b)
    return name


_TARGETS = {
    "verl.experimental.agent_loop.agent_loop": lambda mod: (_patch_agent_loop(mod.AgentLoopWorker),
                                                            _patch_agent_loop_seed(mod.AgentLoopWorker)),
    "verl.trainer.ppo.v1.agent_loop_tq": lambda mod: (_patch_agent_loop(mod.AgentLoopWorkerTQ),
                                                      _patch_agent_loop_seed(mod.AgentLoopWorkerTQ)),
    "verl.workers.engine.base": _patch_engine_base,
    "verl.workers.engine.megatron.transformer_impl": _patch_weight_export,
}
_done: set[str] = set()


after_import.install(_TARGETS, _done)
