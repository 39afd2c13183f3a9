"""verl's real Megatron engine (`MegatronEngineWithLMHead.__init__`, `forward_step`, `forward_backward_batch`,
`train_batch`, `optimizer_step`, `get_per_tensor_param`) driving a tiny real Megatron GPT-MoE on CPU gloo ranks.

Real: the engine class from verl's `EngineRegistry` and its `__init__` (McoreEngineConfig / HFModelConfig /
McoreOptimizerConfig / CheckpointConfig; it initialises Megatron's model-parallel state itself, EP 2, and
applies verl's router-replay patch); verl's GPT `forward_step` (THD packing through `preprocess_thd_engine`,
R3 alignment and replay mask, `set_router_replay_data`, the LM-head log-prob processor), verl's
`sft_loss`, `postprocess_micro_batch_func`, `prepare_micro_batches`, `infer_batch` and Megatron's
no-pipelining schedule; a Megatron `GPTModel` (local spec: a dense layer and two MoE layers with SequentialMLP
experts, all-to-all dispatcher, permute fusion off, MoE activation recompute) wrapped in Megatron DDP
(`overlap_grad_reduce` on, through verl's `override_ddp_config`) by verl's own
`wrap_model_chunks_with_layerwise_aware_ddp`; Megatron's optimizer built by verl's `_build_optimizer` (Adam,
grad clipping, training hooks; fp32, no distributed optimizer); relibra's patches (loaded through the
`verl.plugins` entry point on `import verl`) and runtime.

Test-only stand-ins (CPU only, never in shipped code):
  * verl's device layer: a CPU platform registered through verl's platform plugin registry (`_cpu_platform`,
    loaded by `VERL_USE_EXTERNAL_MODULES`, selected by `VERL_PLATFORM`), so verl's tensors land on "cpu";
  * Megatron on CPU: relibra.runtime.cpu_compat, plus tensors created with a hard-coded device="cuda" routed
    to CPU in pipeline_parallel/schedules.py ~749, optimizer/optimizer.py ~1249, optimizer/clip_grads.py
    ~96-231 and utils.py ~1332 (`_cpu_devices`); `VERL_ENGINE_DEVICE=cuda` (verl registers its Megatron
    engines for device "cuda" only, so the registry picks the real MegatronEngineWithLMHead);
  * attention: Megatron's local `DotProductAttention` rejects packed THD input (dot_product_attention.py
    ~153); relibra's CPU platform's `PackedDotProductAttention` runs the same math with a block-diagonal
    causal mask from cu_seqlens (the one `make e2e` runs);
  * model build and weight export: Megatron-Bridge does not install with Python 3.11 + megatron-core 0.19,
    so the GPT model is built directly and set as the engine's module (what `initialize()` would do), and
    `get_per_tensor_param` exports through a stand-in with Megatron-Bridge's naming contract (local expert i
    of EP rank k is HF expert i + k * E / EP); no tokenizer files: `model_config.tokenizer` is a stand-in
    with `pad_token_id` (all forward_step reads, transformer_impl.py ~1405);
  * fp32 and no distributed optimizer: Megatron's DistributedOptimizer and Float16Optimizer accept only
    torch.cuda tensor types (distrib_optimizer.py ~466-482, optimizer.py ~1009-1037); so verl's
    `load_megatron_model_to_gpu` (megatron_utils.py ~827, reads the param buffer that only the distributed
    optimizer allocates) is a no-op here (nothing is offloaded on CPU);
  * verl's `set_random_seed` seeds Megatron's RNG tracker only when an accelerator is counted
    (workers/engine/megatron/utils.py ~35): seeded here.
Instrumentation (observes, calls through): verl's `set_router_replay_data` calls, a forward hook on each
router comparing the routed experts with the replayed ones, relibra's micro-batch selections.
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np

E, K, V = 8, 2, 32
NUM_LAYERS = 3               # layer 0 dense, layers 1-2 MoE
MOE_FREQ = [0, 1, 1]
H, HEADS, FFN, MOE_FFN = 16, 2, 32, 8


def _setup_process():
    """CPU adaptations, in the order verl needs them (the platform before verl is imported)."""
    assert "verl" not in sys.modules, "verl imported before the test platform was selected"
    os.environ["VERL_USE_EXTERNAL_MODULES"] = "_cpu_platform"
    os.environ["VERL_PLATFORM"] = "cpu_test"
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"  # verl registers its Megatron engines for device "cuda" only
    import logging

    logging.getLogger("relibra_verl").setLevel(logging.ERROR)
    from relibra_verl.runtime import cpu_compat

    cpu_compat.apply()
    import verl  # noqa: F401  loads _cpu_platform and relibra's entry point
    from verl.utils.device import get_device_name

    assert get_device_name() == "cpu", get_device_name()
    _cpu_devices()


def _cpu_devices():
    """Megatron modules that create tensors with a hard-coded device="cuda": route them to CPU (test-only).
    pipeline_parallel/schedules.py ~749 (forward_backward_no_pipelining), optimizer/optimizer.py ~1249
    (FP32Optimizer.__init__), optimizer/clip_grads.py ~96-231 (grad norm, zero count), utils.py ~1332
    (local_multi_tensor_l2_norm, the fallback without apex / Transformer Engine)."""
    import megatron.core.optimizer.clip_grads as clip
    import megatron.core.utils as mutils
    import megatron.core.optimizer.optimizer as opt
    import megatron.core.pipeline_parallel.schedules as sched

    for mod in (sched, opt, clip, mutils):
        if getattr(mod.torch, "_relibra_cpu", False):
            continue
        mod.torch = _CPUTorch(mod.torch)


class _CPUTorch:
    """`torch` for one module, with device="cuda" in tensor factories read as "cpu"."""

    _relibra_cpu = True

    def __init__(self, real):
        self._real = real
        for fn in ("zeros", "ones", "empty", "tensor", "full"):
            setattr(self, fn, self._cpu(getattr(real, fn)))

    @staticmethod
    def _cpu(fn):
        def call(*a, **kw):
            if str(kw.get("device", "")).startswith("cuda"):
                kw["device"] = "cpu"
            return fn(*a, **kw)
        return call

    def __getattr__(self, name):
        return getattr(self._real, name)


def _configs(tmpdir: str, ep: int):
    """verl's real config dataclasses for a tiny Qwen3-MoE-shaped model (HF config.json, no tokenizer)."""
    import json

    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import HFModelConfig, McoreEngineConfig, McoreOptimizerConfig
    from verl.workers.config.engine import EngineRouterReplayConfig as RouterReplayConfig

    os.makedirs(tmpdir, exist_ok=True)
    with open(os.path.join(tmpdir, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": V,
                   "hidden_size": H, "intermediate_size": FFN, "moe_intermediate_size": MOE_FFN,
                   "num_hidden_layers": NUM_LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
                   "num_experts": E, "num_experts_per_tok": K, "mlp_only_layers": [0],
                   "tie_word_embeddings": False, "max_position_embeddings": 64}, f)
    model = HFModelConfig(path=tmpdir, load_tokenizer=False)
    model.tokenizer = types.SimpleNamespace(pad_token_id=0)  # forward_step reads only pad_token_id (no tokenizer files)
    engine = McoreEngineConfig(expert_model_parallel_size=ep, use_distributed_optimizer=False,
                               router_replay=RouterReplayConfig(mode="R3"), use_remove_padding=True,
                               dtype="bfloat16", seed=7, override_ddp_config={"overlap_grad_reduce": True})
    optim = McoreOptimizerConfig(lr=1e-2, clip_grad=1.0, weight_decay=0.0)
    return model, engine, optim, CheckpointConfig()


def _gpt_model(ep: int):
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=NUM_LAYERS, hidden_size=H, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        num_moe_experts=E, moe_router_topk=K, moe_ffn_hidden_size=MOE_FFN, moe_layer_freq=MOE_FREQ,
        moe_token_dispatcher_type="alltoall", moe_permute_fusion=False, moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", expert_model_parallel_size=ep,
        enable_routing_replay=True,  # verl's router-replay patch (applied by the engine's __init__)
        use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32, bf16=False,
        gradient_accumulation_fusion=False, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        variable_seq_lengths=True, recompute_granularity="selective", recompute_modules=["moe"])
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    from relibra_verl.patches.cpu_platform import packed_attention_class

    attn = packed_attention_class()
    for layer_spec in spec.layer_specs:
        layer_spec.submodules.self_attention.submodules.core_attention = attn
    torch.manual_seed(1234)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=V, max_sequence_length=64,
                     pre_process=True, post_process=True, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope")
    _distinct_weights(model)
    return model, cfg


def _distinct_weights(model):
    """Same dense weights on every rank (as a loaded checkpoint would be); each expert a function of its
    global id only, so a token computed by a wrong expert shows up as a difference."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from relibra_verl.integration.runtime_bridge import iter_moe_layers

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." not in name:
                dist.broadcast(p.data, src=0)
        rank = mpu.get_expert_model_parallel_rank()
        for l, layer in enumerate(iter_moe_layers(model)):
            S = layer.num_local_experts
            for i, expert in enumerate(layer.experts.local_experts):
                gen = torch.Generator().manual_seed(1000 * l + rank * S + i)
                for p in expert.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


class BridgeStandIn:
    """Megatron-Bridge's export contract as verl's get_per_tensor_param uses it (lazy (hf_name, tensor)
    generator; local expert i of EP rank k is expert i + k * E / EP)."""

    export_weight_dtype = None

    def get_conversion_tasks(self, module):
        return None

    def export_hf_weights(self, module, conversion_tasks=None):
        from megatron.core import parallel_state as mpu

        from relibra_verl.integration.runtime_bridge import iter_moe_layers

        rank = mpu.get_expert_model_parallel_rank()
        for l, layer in enumerate(iter_moe_layers(module)):
            S = layer.num_local_experts
            for i, expert in enumerate(layer.experts.local_experts):
                for n, p in expert.named_parameters():
                    yield f"model.moe_layers.{l}.mlp.experts.{rank * S + i}.{n}", p.detach()


def build_engine(tmpdir: str, ep: int, relibra_section: dict):
    """verl's engine (real __init__), the GPT-MoE in Megatron DDP as its module, Megatron's optimizer."""
    import torch
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from verl.workers.engine.base import EngineRegistry

    model_cfg, engine_cfg, optim_cfg, ckpt_cfg = _configs(tmpdir, ep)
    eng = EngineRegistry.new(model_type="language_model", backend="megatron", model_config=model_cfg,
                             engine_config=engine_cfg, optimizer_config=optim_cfg, checkpoint_config=ckpt_cfg)
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    assert type(eng) is MegatronEngineWithLMHead, type(eng)
    model_parallel_cuda_manual_seed(1234)  # verl skips the RNG tracker when no accelerator is counted
    model, tf = _gpt_model(ep)
    _check_replayed_routing(model)
    # verl's own DDP wrap (what make_megatron_module does), with verl's DDP overrides (grad_reduce_in_fp32)
    from verl.utils.megatron_utils import wrap_model_chunks_with_layerwise_aware_ddp

    (ddp,) = wrap_model_chunks_with_layerwise_aware_ddp(
        [model], tf, use_distributed_optimizer=engine_cfg.use_distributed_optimizer,
        override_ddp_config=eng._resolve_override_ddp_config())
    from relibra_verl.integration.runtime_bridge import iter_moe_layers

    assert ddp.ddp_config.overlap_grad_reduce and all(l.moe_layer_recompute for l in iter_moe_layers(ddp))
    # what initialize() sets (Megatron-Bridge parts stand in)
    eng.tf_config = tf
    eng.module = [ddp]
    eng.param_dtype = eng.dtype = torch.float32
    eng.is_value_model = False
    eng.share_embeddings_and_output_weights = False
    eng.bridge, eng.vanilla_bridge, eng.peft_cls, eng.provider = BridgeStandIn(), False, None, None
    eng.optimizer = eng._build_optimizer()
    # verl's load_megatron_model_to_gpu (megatron_utils.py ~827) reads the DDP param buffer, which Megatron
    # allocates only for the distributed optimizer (not runnable on CPU: it asserts torch.cuda tensor types,
    # distrib_optimizer.py ~466). Nothing is offloaded here, so loading to the device is a no-op.
    import verl.workers.engine.megatron.transformer_impl as ti

    ti.load_megatron_model_to_gpu = lambda *a, **k: None
    _count_replay_calls(ti)
    eng.lr_scheduler = None
    # what relibra's ActorRolloutRefWorker.init_model wrapper does: the raw `actor_rollout_ref` DictConfig
    from omegaconf import OmegaConf

    from relibra_verl.integration.plugin import attach_from_worker

    worker = types.SimpleNamespace(config=OmegaConf.create({"actor": {"strategy": "megatron"},
                                                            "relibra": relibra_section}),
                                   actor=types.SimpleNamespace(engine=eng))
    st = attach_from_worker(worker)
    assert (st is not None) == bool(relibra_section["enable"])
    if st is not None:
        _record_selections(st)
    return eng


REPLAY_CALLS = []
ROUTER_CHECKS = []  # per router forward: (rows, replayed rows, replayed rows routed elsewhere)


def _check_replayed_routing(model):
    """Forward hook on every MoE router: on the rows verl's R3 mask replays, the experts the layer routed to
    (routing_map) are exactly the rollout's routes handed over by set_router_replay_data."""
    import torch
    from megatron.core.transformer.moe.router import TopKRouter
    from verl.utils.megatron.router_replay_patch import RouterReplayAction

    def hook(router, inputs, output):
        rr = router.router_replay
        if rr is None or rr.router_replay_action != RouterReplayAction.REPLAY_FORWARD or rr.target_topk_idx is None:
            return
        routing_map = output[1]
        target = torch.zeros_like(routing_map).scatter_(1, rr.target_topk_idx.long(), True)
        mask = rr.target_replay_mask
        rows = torch.ones(routing_map.shape[0], dtype=torch.bool) if mask is None else mask.bool()
        wrong = int((routing_map[rows] != target[rows]).any(1).sum())
        ROUTER_CHECKS.append((int(routing_map.shape[0]), int(rows.sum()), wrong))

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(hook)


def _count_replay_calls(ti):
    """Count verl's set_router_replay_data calls from forward_step (instrumentation; verl's function runs)."""
    if getattr(ti.set_router_replay_data, "_counted", False):
        return
    orig = ti.set_router_replay_data

    def counted(layers_topk_idx, *args, **kwargs):
        REPLAY_CALLS.append(tuple(layers_topk_idx.values().shape[1:]))  # (decoder layers, top-k)
        return orig(layers_topk_idx, *args, **kwargs)

    counted._counted = True
    ti.set_router_replay_data = counted


def _record_selections(st):
    """Log which micro-batch relibra selects, and when: from verl's forward_step (before the forward) and
    from the backward hook on forward_step's output (before that micro-batch's backward)."""
    st.selections = []
    orig = st.on_forward

    def on_forward(batch, output=None):
        phase = "backward" if _in_backward() else "forward"
        orig(batch, output)
        st.selections.append((_mb(batch), st.runtime.micro_batch, phase))
    st.on_forward = on_forward


def _in_backward() -> bool:
    import torch

    return torch._C._current_autograd_node() is not None


def _mb(batch):
    from relibra_verl.integration.trainer import _mb_index

    return _mb_index(batch)


def _batch(seed: int, rank: int):
    import sys as _sys

    _sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _data import v1_batch
    from verl.utils import tensordict_utils as tu

    data = v1_batch(100 * rank + seed, 6, E, K, NUM_LAYERS, max_len=10, max_token_len=24, skew=1.5)
    data["routed_experts"].values()[:, [i for i, moe in enumerate(MOE_FREQ) if not moe]] = 0  # vLLM: dense = 0
    tu.assign_non_tensor(data, temperature=1.0)
    return data


def run(rank: int, world: int, tmpdir: str, steps: int = 2) -> dict:
    """Two optimizer steps with relibra off, then on (same init, same data): losses, metrics, export."""
    import functools

    _setup_process()
    from verl.workers.utils.losses import sft_loss

    # profile none: on this toy model a time-aware planner would rightly make no replica; this run is here to
    # exercise the replica path (the time-aware limits are tested in test_microbatch.py)
    on = {"enable": True, "mode": "both", "replica_slots": 1, "gpus_per_node": world, "reorder_every": 1,
          "profile": "none"}
    loss_fn = functools.partial(sft_loss, None)
    import verl.workers.engine.megatron.transformer_impl as ti

    from relibra_verl.integration import plugin

    fs = ti.MegatronEngineWithLMHead.forward_step
    out = {"patched": plugin.status()["patched"].get(ti.__name__, []),
           "forward_step_is_verls": getattr(fs, "__wrapped__", None) is not None
           and fs.__wrapped__.__module__ == ti.__name__ and fs.__wrapped__.__qualname__ ==
           "MegatronEngineWithLMHead.forward_step"}
    for name, section in (("off", {"enable": False}), ("on", on)):
        REPLAY_CALLS.clear()
        ROUTER_CHECKS.clear()
        eng = build_engine(os.path.join(tmpdir, f"r{rank}"), world, section)
        losses, metrics, by_step, grad_norms = [], [], [], []
        for step in range(steps):
            if getattr(eng, "_relibra", None) is not None:
                eng._relibra.selections.append(("step", step))
            start = len(ROUTER_CHECKS)
            res = eng.train_batch(_batch(step, rank), loss_fn)
            by_step.append(ROUTER_CHECKS[start:])
            losses.append(float(np.sum(res["loss"])))
            metrics.append({k: v for k, v in res["metrics"].items() if k.startswith("relibra/")})
            grad_norms.append(float(res["metrics"]["grad_norm"]))
        # forward only (verl's compute_log_prob path: infer_batch, R3 replay, relibra plans replicas too)
        if getattr(eng, "_relibra", None) is not None:
            eng._relibra.selections.append(("infer", 0))
        inferred = eng.infer_batch(_batch(7, rank), None)
        log_probs = inferred["model_output"]["log_probs"]
        gen, _ = eng.get_per_tensor_param()
        res = {"losses": losses, "metrics": metrics, "grad_norms": grad_norms, "replay_calls": list(REPLAY_CALLS),
               "log_probs": (log_probs.values() if log_probs.is_nested else log_probs).numpy().copy(),
               "router_checks": list(ROUTER_CHECKS), "router_checks_by_step": by_step,
               "engine_class": f"{type(eng).__module__}.{type(eng).__qualname__}",
               "export": {n: t.numpy().copy() for n, t in gen},
               "dense": {n: p.detach().numpy().copy() for n, p in eng.module[0].named_parameters()
                         if ".experts." not in n}}
        st = getattr(eng, "_relibra", None)
        if st is not None:
            res["runtime"] = type(st.runtime).__name__ if st.runtime is not None else None
            res["placement"] = None if st.runtime is None else np.asarray(st.runtime.expert_at_home).copy()
            if st.runtime is not None:
                m = st.runtime.metrics
                res["replica_sync_bytes"] = m.replica_sync_bytes
                res["runtime_fallbacks"] = m.fallback_micro_batches
            res["selections"] = list(st.selections)
        out[name] = res
    return out
