"""Thin, version-checked wrappers of verl 0.9.1 that hand the actor's mini-batches to relibra.

Every wrapper calls verl's own function; an engine without relibra state (`engine._relibra`, set on the
actor engine and the reference model's engine when `actor_rollout_ref.relibra.enable=true`) takes the
native path unchanged. Nothing
here replaces verl's router-replay patch: `forward_step` still calls `set_router_replay_data`, and
relibra's runtime chains onto the patched `TopKRouter.routing` / dispatcher `preprocess`.

Wrapped (verl/workers/engine/megatron/transformer_impl.py unless noted):
  prepare_micro_batches (module global, from verl/workers/engine/utils.py)   -> trainer.on_micro_batches
  MegatronEngine.forward_backward_batch                                      -> begin / finish
  MegatronEngineWithLMHead.forward_step                                      -> plan per micro-batch
  MegatronEngine.optimizer_step                                              -> reordering after the step
  MegatronEngine.train_batch                                                 -> relibra/moved_experts
  MegatronEngine.get_per_tensor_param(_shard), save_checkpoint               -> canonical expert order
  MegatronEngine.disable_adapter                                             -> the ref pass with LoRA
  verl/workers/engine_workers.py ActorRolloutRefWorker.init_model / update_actor -> attach to the actor
                                                                                and to the ref engine
  verl/utils/config.py validate_config (used by main_ppo)                    -> check the section early
"""
from __future__ import annotations

import functools
import logging

logger = logging.getLogger("relibra_verl")
MARK = "_relibra_wrapped"


def _wrap(owner, name: str, make):
    """Replace owner.name by make(original) once; returns the dotted name patched, or None if already."""
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return None
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, MARK, True)
    setattr(owner, name, wrapper)
    return f"{getattr(owner, '__name__', owner)}.{name}"


def _state(engine):
    return getattr(engine, "_relibra", None)


# ---- transformer_impl --------------------------------------------------------------------------------
def patch_transformer_impl(mod) -> list[str]:
    """Wrap the Megatron engine (module verl.workers.engine.megatron.transformer_impl)."""
    done = []
    Engine, LMHead = mod.MegatronEngine, mod.MegatronEngineWithLMHead

    def make_prepare(orig):
        def prepare_micro_batches(*args, **kwargs):
            micro_batches, indices = orig(*args, **kwargs)
            from relibra_verl.integration.trainer import active

            st = active()
            if st is not None:
                st.on_micro_batches(micro_batches)
            return micro_batches, indices
        return prepare_micro_batches

    def make_fbb(orig):
        def forward_backward_batch(self, data, loss_function, forward_only=False):
            st = _state(self)
            if st is None:
                return orig(self, data, loss_function, forward_only=forward_only)
            st.begin(self, data, forward_only)
            try:
                output = orig(self, data, loss_function, forward_only=forward_only)
            finally:
                st.end()
            st.finish(output)
            return output
        return forward_backward_batch

    def make_opt_step(orig):
        def optimizer_step(self):
            grad_norm = orig(self)
            st = _state(self)
            if st is not None:
                st.after_optimizer_step(self)
            return grad_norm
        return optimizer_step

    def make_train_batch(orig):
        def train_batch(self, data, loss_function):
            output = orig(self, data, loss_function)
            st = _state(self)
            if st is not None:
                st.add_step_metrics(output)
            return output
        return train_batch

    def make_export(orig):
        def export(self, *args, **kwargs):
            st = _state(self)
            if st is None:
                return orig(self, *args, **kwargs)
            # verl returns lazy generators consumed later: hold canonical order until they are drained
            ctx = st.export_context()
            ctx.__enter__()
            try:
                out = orig(self, *args, **kwargs)
            except BaseException:
                ctx.__exit__(None, None, None)
                raise
            if isinstance(out, tuple) and out and hasattr(out[0], "__next__"):
                return (_held(out[0], ctx), *out[1:])
            ctx.__exit__(None, None, None)
            return out
        return export

    def make_disable_adapter(orig):
        def disable_adapter(self):
            ctx = orig(self)
            st = _state(self)
            return ctx if st is None else _AdapterOff(st, ctx)
        return disable_adapter

    for name, make in (("forward_backward_batch", make_fbb), ("optimizer_step", make_opt_step),
                       ("disable_adapter", make_disable_adapter),
                       ("train_batch", make_train_batch), ("get_per_tensor_param", make_export),
                       ("get_per_tensor_param_shard", make_export), ("save_checkpoint", make_export)):
        if name == "train_batch" and "train_batch" not in Engine.__dict__:
            Engine.train_batch = Engine.train_batch  # own attribute on MegatronEngine, not BaseEngine's
        done.append(_wrap(Engine, name, make))
    done.append(_wrap(LMHead, "forward_step", _make_forward_step))
    done.append(_wrap(mod, "prepare_micro_batches", make_prepare))
    return [d for d in done if d]


def _make_forward_step(orig):
    def forward_step(self, batch_iter, model, *args, **kwargs):
        st = _state(self)
        if st is None or st.plan is None:
            return orig(self, batch_iter, model, *args, **kwargs)
        seen = []

        def peek():  # verl calls next(batch_iter) first thing: select the plan before the forward
            for batch in batch_iter:
                st.on_forward(batch)
                seen.append(batch)
                yield batch
        output, post = orig(self, peek(), model, *args, **kwargs)
        if seen:
            _on_backward_start(output, functools.partial(st.on_forward, seen[0]))
        return output, post
    return forward_step


def patch_engine_class(cls) -> list[str]:
    """Wrap `forward_step` of a MegatronEngine subclass that overrides it (e.g. one registered with verl's
    EngineRegistry), the same way as MegatronEngineWithLMHead's."""
    if "forward_step" not in cls.__dict__:
        return []
    return [d for d in (_wrap(cls, "forward_step", _make_forward_step),) if d]


class _AdapterOff:
    """verl's disable_adapter() context (the ref pass of a LoRA actor), telling relibra it runs the ref pass."""

    def __init__(self, st, ctx):
        self.st, self.ctx = st, ctx

    def __enter__(self):
        out = self.ctx.__enter__()
        self.st.adapter_disabled = True
        return out

    def __exit__(self, *exc):
        self.st.adapter_disabled = False
        return self.ctx.__exit__(*exc)


def _held(gen, ctx):
    try:
        yield from gen
    finally:
        ctx.__exit__(None, None, None)


def _on_backward_start(output, fn) -> None:
    """Call fn when the backward of this micro-batch reaches its output (before any MoE layer backward)."""
    import torch

    tensors = [output] if torch.is_tensor(output) else (
        [v for v in output.values() if torch.is_tensor(v)] if isinstance(output, dict) else [])
    def hook(grad):
        fn()
        return None  # the gradient passes unchanged

    for t in tensors:
        if t.requires_grad:
            t.register_hook(hook)
            return


# ---- engine_workers ----------------------------------------------------------------------------------
def patch_engine_workers(mod) -> list[str]:
    """Attach relibra to the actor engine of ActorRolloutRefWorker (verl.workers.engine_workers)."""
    Worker = mod.ActorRolloutRefWorker

    def make_init(orig):
        def init_model(self, *args, **kwargs):
            from relibra_verl.integration.plugin import attach_from_worker

            attach_from_worker(self, validate_only=True)  # typos fail before the model is built
            out = orig(self, *args, **kwargs)
            attach_from_worker(self)
            return out
        return init_model

    def make_update(orig):
        def update_actor(self, *args, **kwargs):
            from relibra_verl.integration.plugin import attach_from_worker, count_patch_failures

            attach_from_worker(self)  # idempotent; covers loading through model.external_lib
            return count_patch_failures(self, orig(self, *args, **kwargs))
        return update_actor

    return [d for d in (_wrap(Worker, "init_model", make_init), _wrap(Worker, "update_actor", make_update)) if d]


# ---- verl.utils.config -------------------------------------------------------------------------------
def patch_verl_config(mod) -> list[str]:
    """Validate the relibra section in the driver, right after verl's own validate_config (main_ppo imports
    it by name from verl.utils.config after `import verl` has loaded this plugin)."""
    if not hasattr(mod, "validate_config"):
        return []

    def make_validate(orig):
        def validate_config(config, *args, **kwargs):
            from relibra_verl.config import from_actor_rollout_ref

            from_actor_rollout_ref(config.get("actor_rollout_ref") if hasattr(config, "get") else None)
            return orig(config, *args, **kwargs)
        return validate_config

    return [d for d in (_wrap(mod, "validate_config", make_validate),) if d]
