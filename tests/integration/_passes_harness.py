"""A GRPO step's three passes on verl's real Megatron engine path, EP 2 on gloo (see _engine_harness for what
is real and what stands in): the actor's old-log-prob forward (`infer_batch`, routes replayed, its own
split), the reference model's forward (a second engine, forward only, no optimizer, no router replay: its
router routes live, as in verl), then the actor's update (`train_batch`).

The reference model's router is all zeros: every token goes to the same two experts (experts 6 and 5:
torch's top-k breaks the tie), and the batches' replayed routes favour those two, so relibra's prediction
of the ref's loads (the batch's replayed routes) is right in where the load is and wrong token by token.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import _engine_harness as eh  # noqa: E402
from _data import v1_batch  # noqa: E402

NUM_SEQS, LOGPROB_TOKENS, UPDATE_TOKENS = 6, 30, 20
HOT = [6, 5, 7, 4, 3, 2, 1, 0]  # the experts the batches favour, hottest first; the zero router's two lead


def _batch(rank: int, step: int, *, max_token_len: int, replay: bool = True):
    """The step's batch on this DP rank, as verl hands it to each pass (a fresh TensorDict per call)."""
    from verl.utils import tensordict_utils as tu

    data = v1_batch(100 * rank + step, NUM_SEQS, eh.E, eh.K, eh.L_ALL, max_len=10, max_token_len=max_token_len,
                    skew=0.7, hot=HOT)
    tu.assign_non_tensor(data, enable_routing_replay=replay)  # verl's compute_ref_log_prob sets False
    return data


def _ref_engine(ti, cfg):
    """verl's reference engine: forward only (no optimizer), router_replay disabled, zero router."""
    import types

    eng = eh.build_engine(ti, None)
    eng.engine_config.router_replay = types.SimpleNamespace(mode="disabled")
    eng.enable_routing_replay = False
    eng.optimizer = None
    with torch.no_grad():
        for layer in eng.module[0].layers:
            for p in layer.router.parameters():
                p.zero_()
    if cfg is not None:
        from relibra_verl.integration.plugin import attach

        assert attach(eng, cfg, role="ref") is not None
    return eng


def _log_probs(out) -> list[np.ndarray]:
    return [t.numpy().copy() for t in out["model_output"]["log_probs"].unbind()]


def _sabotage(trainer) -> None:
    """A wrong placement: after each placement the log-prob pass applies, the runtime's record of layer 0
    swaps two experts that the weights did not swap (tokens of each reach the other's weights)."""
    apply = trainer._apply_placement

    def wrong(placement):
        out = apply(placement)
        eah = trainer.runtime.expert_at_home
        eah[0, [0, -1]] = eah[0, [-1, 0]]
        return out

    trainer._apply_placement = wrong


def run(rank: int, world: int, steps: int = 2) -> dict:
    """`steps` GRPO steps (log-prob pass, ref pass, update) with relibra off, on, on with a sabotaged
    placement, and (one step each) on for the update only and on with optimizer offload: log-probs, ref
    log-probs, losses, the update's metrics."""
    from relibra_verl.config import RelibraConfig

    ti = eh._setup(world)
    cfg = RelibraConfig(enable=True, mode="both", replica_slots=1, gpus_per_node=world, reorder_every=1,
                        profile="none")
    import dataclasses

    update_only = dataclasses.replace(cfg, passes={"update": True, "logprob": False, "ref": False})
    out = {}
    for name, rc in (("off", None), ("on", cfg), ("sabotaged", cfg), ("update_only", update_only),
                     ("optimizer_offload", cfg)):
        actor, ref = eh.build_engine(ti, rc), _ref_engine(ti, rc)
        actor._is_offload_optimizer = name == "optimizer_offload"   # verl's MegatronEngine attribute
        if name == "sabotaged":
            _sabotage(actor._relibra)
        res = {"logprob": [], "ref": [], "losses": [], "metrics": []}
        for step in range(1 if name in ("update_only", "optimizer_offload") else steps):
            res["logprob"].append(_log_probs(actor.infer_batch(_batch(rank, step, max_token_len=LOGPROB_TOKENS))))
            res["ref"].append(_log_probs(ref.infer_batch(_batch(rank, step, max_token_len=LOGPROB_TOKENS,
                                                                 replay=False))))
            upd = actor.train_batch(_batch(rank, step, max_token_len=UPDATE_TOKENS), eh._loss)
            res["losses"].append(float(np.sum(upd["loss"])))
            res["metrics"].append({k: v for k, v in upd["metrics"].items() if k.startswith("relibra/")})
        # verl's ref pass with LoRA: the actor without its adapter (a stand-in adapter that changes nothing)
        import contextlib
        import types

        from relibra_verl.integration import trainer as tr

        actor.peft_cls = types.SimpleNamespace(disable_adapter=lambda module: contextlib.nullcontext())
        tr._pending_pass_metrics.clear()
        with actor.disable_adapter():
            res["ref_in_actor"] = _log_probs(actor.infer_batch(_batch(rank, steps, max_token_len=LOGPROB_TOKENS)))
        res["ref_in_actor_metrics"] = dict(tr._pending_pass_metrics)
        tr._pending_pass_metrics.clear()   # no update follows to report them
        if rc is not None:
            res["placement"] = np.asarray(actor._relibra.runtime.expert_at_home).copy()
            res["ref_placement"] = np.asarray(ref._relibra.runtime.expert_at_home).copy()
        out[name] = res
    return out
