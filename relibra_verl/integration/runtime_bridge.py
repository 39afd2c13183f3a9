"""The one seam between the verl glue and relibra's Megatron runtime (relibra_verl.runtime).

The glue calls only the functions below. Each looks the runtime API up by name, so a runtime that lacks a
step (e.g. reordering) degrades to the native path for that step with one logged reason, never silently.

  build(model_chunks, topo, cfg)       -> handle | None   RelibraRuntime + patch_layer for each MoE layer
  set_plan(handle, plan)                                   collective: validate + hash-check on every EP rank
  extend_plan(handle, plan, error=None)                    collective: the same plan with more micro-batches
  set_micro_batch(handle, m)                               before the forward (and the backward) of micro-batch m
  apply_placement(handle, placement, optimizer) -> int|None after optimizer.step: move weights + optimizer state
  canonical_export(handle, optimizer)  -> context manager  weights/checkpoints in canonical expert order

Runtime API used (relibra_verl/runtime): RelibraRuntime(topo, ep_group, kernels, strict) with patch_layer,
attach_ddp, set_plan, extend_plan, set_micro_batch, expert_at_home; apply_placement(rt, placement, optimizer) and
canonical_order(rt, optimizer) from relibra_verl.runtime (or relibra_verl.runtime.reorder).
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np

from relibra_verl.planner.types import identity_placement

logger = logging.getLogger("relibra_verl")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning("relibra-verl: %s", msg)


def _runtime_class():
    try:
        import relibra_verl.runtime as rt_pkg

        cls = getattr(rt_pkg, "RelibraRuntime", None)
        if cls is None:
            from relibra_verl.runtime.moe import RelibraRuntime as cls
        return cls
    except ImportError as exc:
        _warn_once("no-runtime", f"runtime unavailable ({exc}); MoE layers keep Megatron's dispatch")
        return None


def iter_moe_layers(model_chunks):
    """Megatron MoELayer modules of the model chunks, in model order."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                yield module


def build(model_chunks, topo, cfg, ep_group):
    """A runtime with every MoE layer of the model patched; None (logged) when it cannot run."""
    cls = _runtime_class()
    if cls is None:
        return None
    rt = cls(topo, ep_group=ep_group, kernels=cfg.kernels, strict=cfg.strict)
    for i, layer in enumerate(iter_moe_layers(model_chunks)):
        rt.patch_layer(layer, i)
    rt.attach_ddp(model_chunks)  # replica gradients may stay in flight until DDP reduces their bucket
    return rt


def set_plan(handle, plan) -> None:
    if handle is not None:
        handle.set_plan(plan)


def extend_plan(handle, plan, error: str | None = None) -> None:
    if handle is not None:
        handle.extend_plan(plan, error=error)


def set_micro_batch(handle, m: int) -> None:
    if handle is not None:
        handle.set_micro_batch(m)


def applied_placement(handle, num_layers: int, topo) -> np.ndarray:
    """[L, E] placement the layers hold now (identity without a runtime)."""
    eah = getattr(handle, "expert_at_home", None) if handle is not None else None
    return identity_placement(topo, num_layers) if eah is None else np.asarray(eah)


def _runtime_fn(name: str):
    """A runtime function taking the runtime as first argument (relibra_verl.runtime, then .reorder)."""
    import importlib

    for mod in ("relibra_verl.runtime", "relibra_verl.runtime.reorder"):
        try:
            fn = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            fn = None
        if fn is not None:
            return fn
    return None


def apply_placement(handle, placement: np.ndarray, optimizer=None) -> int | None:
    """Move experts to `placement` [L, E] (weights, fp32 main params, optimizer state; collective over EP).
    Returns the number of experts whose home rank changed, or None when the runtime cannot reorder
    (placement unchanged, reason logged once)."""
    if handle is None:
        return None
    fn = _runtime_fn("apply_placement")
    if fn is None:
        _warn_once("no-reorder", "runtime has no apply_placement: reordering is skipped, placement stays")
        return None
    S = handle.topo.S
    before = invert(np.asarray(handle.expert_at_home)) // S
    fn(handle, np.asarray(placement), optimizer)
    return int((before != invert(np.asarray(handle.expert_at_home)) // S).sum())


def invert(expert_at_home: np.ndarray) -> np.ndarray:
    from relibra_verl.planner.types import invert_placement

    return invert_placement(np.asarray(expert_at_home))


@contextlib.contextmanager
def canonical_export(handle, optimizer=None):
    """Hold the model (and optimizer state) in canonical expert order while weights are read or saved.
    Refuses (raises) to export a reordered model when the runtime offers no way back to canonical order."""
    if handle is None:
        yield
        return
    ctx = _runtime_fn("canonical_order")
    if ctx is not None:
        with ctx(handle, optimizer):
            yield
        return
    eah = getattr(handle, "expert_at_home", None)
    if eah is not None and not (np.asarray(eah) == np.arange(np.asarray(eah).shape[1])).all():
        raise RuntimeError("relibra: experts are reordered but the runtime offers no canonical export; "
                           "refusing to export weights in a non-canonical order")
    yield
