"""Loading relibra into verl: the `verl.plugins` entry point and `actor_rollout_ref.model.external_lib`.

Two ways in, same effect:
  * entry point `relibra = relibra_verl.integration.plugin:register` (pyproject): verl imports this module
    on `import verl` in every process (driver, Ray workers, vLLM servers) and swallows load errors at debug
    level, so everything here logs loudly itself and never raises at import;
  * `actor_rollout_ref.model.external_lib=relibra_verl.integration.plugin`: imported in the worker while
    verl builds the model config (for VERL_USE_EXTERNAL_PLUGINS=none setups).

Importing this module calls `register()`. It checks the versions (verl 0.9.1, megatron-core 0.19.2; anything
else: nothing is patched, native path, one warning), then patches verl modules as they are imported (an
import hook, so `import verl` stays light and no GPU module is imported early): the Megatron engine, the
actor worker, the PPO driver's config check and batch balancing (legacy and V1 trainers) and the vLLM
server's launch arguments. It logs one line saying what was patched. Set RELIBRA_VERL_DISABLE=1 to load
nothing, RELIBRA_VERL_SKIP_VERSION_CHECK=1 to patch other versions at your own risk.

`python -m relibra_verl.integration.plugin --config-dir` prints the folder of the Hydra config
(relibra_megatron_trainer.yaml) for `main_ppo --config-path`.
"""
from __future__ import annotations

import importlib.abc
import importlib.metadata
import logging
import os
import sys
import threading

logger = logging.getLogger("relibra_verl")

SUPPORTED = {"verl": ("0.9.1",), "megatron-core": ("0.19.2",)}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")

# module -> patch function (module) -> list of patched names
_TARGETS = {
    "verl.workers.engine.megatron.transformer_impl": ("relibra_verl.patches.verl_engine", "patch_transformer_impl"),
    "verl.workers.engine_workers": ("relibra_verl.patches.verl_engine", "patch_engine_workers"),
    "verl.utils.config": ("relibra_verl.patches.verl_engine", "patch_verl_config"),
    "verl.trainer.ppo.ray_trainer": ("relibra_verl.integration.data_placement", "patch_ray_trainer"),
    "verl.trainer.ppo.v1.trainer_base": ("relibra_verl.integration.data_placement", "patch_v1_trainer"),
    "verl.workers.rollout.vllm_rollout.vllm_async_server": ("relibra_verl.patches.vllm_routed_experts",
                                                            "patch_vllm_async_server"),
}
_lock = threading.Lock()
_status: dict = {"registered": False, "reason": None, "patched": {}, "failed": {}}


def version_problems() -> list[str]:
    """Installed versions outside SUPPORTED, as readable lines (empty: supported)."""
    out = []
    for dist, ok in SUPPORTED.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist} not installed (need {' or '.join(ok)})")
            continue
        if have not in ok:
            out.append(f"{dist} {have} (tested: {' or '.join(ok)})")
    return out


def status() -> dict:
    """What register() did: registered, reason (when not), patched {module: [names]}, failed {module: error}."""
    return {"registered": _status["registered"], "reason": _status["reason"],
            "patched": {k: list(v) for k, v in _status["patched"].items()},
            "failed": dict(_status.setdefault("failed", {}))}


def _apply(module_name: str, module) -> None:
    patch_module, patch_fn = _TARGETS[module_name]
    try:
        import importlib

        names = getattr(importlib.import_module(patch_module), patch_fn)(module)
    except Exception as exc:  # the native path must survive any patch failure
        logger.error("relibra-verl: patching %s failed (%s: %s); this module runs natively",
                     module_name, type(exc).__name__, exc)
        _status.setdefault("failed", {})[module_name] = f"{type(exc).__name__}: {exc}"
        return
    _status["patched"][module_name] = names
    logger.warning("relibra-verl: patched %s: %s%s", module_name, ", ".join(names) or "(already patched)",
                   _router_replay_note(module_name))


def _router_replay_note(module_name: str) -> str:
    if not module_name.endswith("transformer_impl"):
        return ""
    try:
        from megatron.core.transformer.moe.router import TopKRouter

        on = bool(getattr(TopKRouter, "_router_replay_patched", False))
    except Exception:
        return ""
    return f" (verl router-replay patch {'active' if on else 'not yet applied (verl applies it at engine init)'}; " \
           "relibra chains after it, never replaces it)"


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs the patch of a target module right after the module is executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS or fullname in _status["patched"]:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        exec_module = loader.exec_module

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                exec_module(module)
                _apply(fullname, module)

        spec.loader = _Loader()
        return spec


def register() -> dict:
    """Install relibra's verl patches (idempotent). Returns status(). Never raises."""
    with _lock:
        if _status["registered"] or _status["reason"]:
            return status()
        if os.environ.get("RELIBRA_VERL_DISABLE", "0") == "1":
            _status["reason"] = "RELIBRA_VERL_DISABLE=1"
            return status()
        problems = version_problems()
        if problems and os.environ.get("RELIBRA_VERL_SKIP_VERSION_CHECK", "0") != "1":
            _status["reason"] = "unsupported versions: " + "; ".join(problems)
            logger.warning("relibra-verl: NOT loaded, verl runs natively: %s", _status["reason"])
            return status()
        _status["registered"] = True
        if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())
        for name in _TARGETS:
            if name in sys.modules and name not in _status["patched"]:
                _apply(name, sys.modules[name])
        logger.warning("relibra-verl: registered with verl %s / megatron-core %s; patches apply on import of: %s",
                       _installed("verl"), _installed("megatron-core"), ", ".join(_TARGETS))
        return status()


def _installed(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def attach_from_worker(worker, *, validate_only: bool = False):
    """Validate `worker.config.relibra` and, when enabled, attach a RelibraTrainer to the actor's engine (and
    one to the reference model's engine when the worker holds one and passes.ref is on).

    Called by the ActorRolloutRefWorker wrappers (init_model before/after, update_actor). Returns the
    trainer or None. Engines other than Megatron run natively with one warning.
    """
    from relibra_verl.config import from_actor_rollout_ref

    cfg = from_actor_rollout_ref(getattr(worker, "config", None))
    if not cfg.enable:
        return None
    failed = _status.setdefault("failed", {})
    if failed and cfg.strict:
        from relibra_verl.integration.trainer import RelibraError

        raise RelibraError("relibra: verl patches failed to apply, relibra cannot run as configured: "
                           + "; ".join(f"{m}: {e}" for m, e in failed.items())
                           + " (actor_rollout_ref.relibra.on_missing_routing=error)")
    if validate_only:
        return None
    if cfg.passes.ref:  # the reference model's own engine (absent with LoRA: the ref pass runs on the actor)
        ref_engine = getattr(getattr(worker, "ref", None), "engine", None)
        if ref_engine is not None and getattr(ref_engine, "_relibra", None) is None:
            attach(ref_engine, cfg, role="ref")
    actor = getattr(worker, "actor", None)
    engine = getattr(actor, "engine", None)
    if engine is None:
        return None
    existing = getattr(engine, "_relibra", None)
    if existing is not None:
        return existing
    return attach(engine, cfg)


def count_patch_failures(worker, output):
    """Add `relibra/fallbacks/patch_failed` (modules whose patch failed) to an update's metrics, and to
    `relibra/fallbacks`, so a partly patched verl never looks like a balanced run. Returns `output`."""
    failed = _status.setdefault("failed", {})
    if not failed or output is None:
        return output
    from relibra_verl.config import from_actor_rollout_ref

    if not from_actor_rollout_ref(getattr(worker, "config", None)).enable:
        return output
    from verl.utils import tensordict_utils as tu

    metrics = dict(tu.get(output, "metrics", default=None) or {})
    n = float(len(failed))
    metrics["relibra/fallbacks/patch_failed"] = [n]
    metrics["relibra/fallbacks"] = [float(v) + n for v in metrics.get("relibra/fallbacks", [0.0])]
    tu.assign_non_tensor(output, metrics=metrics)
    return output


def attach(engine, cfg, role: str = "actor"):
    """Put a RelibraTrainer on a verl MegatronEngine (other engines: warning, native path). role: "actor"
    (the policy, with its optimizer) or "ref" (the reference model: forward only, no optimizer)."""
    try:
        from verl.workers.engine.megatron.transformer_impl import MegatronEngine
    except Exception as exc:
        logger.warning("relibra-verl: Megatron engine unavailable (%s); native path", exc)
        return None
    if not isinstance(engine, MegatronEngine):
        logger.warning("relibra-verl: relibra supports verl's Megatron engine only, not %s; native path",
                       type(engine).__name__)
        return None
    from relibra_verl.integration.trainer import RelibraTrainer

    engine._relibra = RelibraTrainer(cfg, engine=engine, role=role)
    logger.warning("relibra-verl: attached to the %s engine: %s", role, cfg)
    return engine._relibra


register()

if __name__ == "__main__":
    if "--config-dir" in sys.argv[1:]:
        print(CONFIG_DIR)
    else:
        print(status())
