"""Make sure verl's vLLM server is launched with `--enable-return-routed-experts` when routes are wanted.

verl 0.9.1 (verl/workers/rollout/vllm_rollout/vllm_async_server.py, `vLLMHttpServer.launch_server`) adds
`enable_return_routed_experts=True` only when `rollout.enable_rollout_routing_replay` is set, and reads
`final_res.outputs[0].routed_experts` only then. It does not ask when only its rollout MoE load metrics
(`rollout.moe_load_balance_metrics_interval > 0`) or relibra's trace capture (`RELIBRA_VERL_RETURN_ROUTES=1`)
want them. This hook wraps `vLLMHttpServer._preprocess_engine_kwargs` (verl's own "mutate engine_kwargs
before the CLI args are built" step) and sets the flag in those cases; it never removes anything and
leaves verl's own R3 path as it is. vLLM < 0.22 is left alone (verl itself refuses R3 there).
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("relibra_verl")
FLAG = "enable_return_routed_experts"
ENV = "RELIBRA_VERL_RETURN_ROUTES"


def wants_routes(rollout_config) -> bool:
    """Whether this rollout should return routed experts (R3, verl's MoE metrics, or relibra's env)."""
    get = (lambda k, d=None: rollout_config.get(k, d)) if hasattr(rollout_config, "get") else (
        lambda k, d=None: getattr(rollout_config, k, d))
    return bool(get("enable_rollout_routing_replay", False)) or (get("moe_load_balance_metrics_interval", 0) or 0) > 0 \
        or os.environ.get(ENV, "0") == "1"


def ensure_return_routed_experts(engine_kwargs: dict, rollout_config) -> bool:
    """Set engine_kwargs[FLAG] = True when routes are wanted and the user did not set it. Returns True if
    it changed engine_kwargs."""
    if FLAG in engine_kwargs or not wants_routes(rollout_config):
        return False
    engine_kwargs[FLAG] = True
    return True


def patch_vllm_async_server(mod) -> list[str]:
    """Wrap vLLMHttpServer._preprocess_engine_kwargs in module verl.workers.rollout.vllm_rollout.vllm_async_server."""
    from packaging import version

    server = getattr(mod, "vLLMHttpServer", None)
    hook = getattr(server, "_preprocess_engine_kwargs", None)
    if hook is None or getattr(hook, "_relibra_wrapped", False):
        return []
    vllm_version = getattr(mod, "_VLLM_VERSION", None)
    if vllm_version is not None and vllm_version < version.parse("0.22.0"):
        logger.warning("relibra-verl: vLLM %s < 0.22 has no routed-experts return; not patched", vllm_version)
        return []

    def _preprocess_engine_kwargs(self, engine_kwargs):
        hook(self, engine_kwargs)
        if ensure_return_routed_experts(engine_kwargs, self.config):
            logger.warning("relibra-verl: vLLM launched with --%s", FLAG.replace("_", "-"))

    _preprocess_engine_kwargs._relibra_wrapped = True
    _preprocess_engine_kwargs.__wrapped__ = hook
    server._preprocess_engine_kwargs = _preprocess_engine_kwargs
    return ["vLLMHttpServer._preprocess_engine_kwargs"]
