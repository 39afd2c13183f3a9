"""verl's real Megatron engine path on CPU gloo ranks, with a small model of real Megatron MoE layers.

What is real: `BaseEngine.train_batch`, `MegatronEngine.forward_backward_batch` (mini-batch -> verl's
`prepare_micro_batches` with dynamic batching and the DP micro-batch count sync -> Megatron's
`forward_backward_no_pipelining` schedule), `MegatronEngine.optimizer_step`, verl's R3 alignment
(`align_r3_router_replay_data`), Megatron `MoELayer`s with the all-to-all dispatcher over EP 2, relibra's
patches installed by the plugin, and relibra's runtime. What stands in (test harness only):
  * a CPU platform for verl (its device layer says cuda) and relibra.runtime.cpu_compat for Megatron;
  * Megatron's schedule makes one `torch.zeros(device="cuda")`: routed to CPU here;
  * the engine is built with `object.__new__` (its __init__ needs Megatron-Bridge, which does not install
    with Python 3.11) and `forward_step` runs embedding -> MoE layers -> head instead of a GPT model
    (Megatron's local attention rejects packed input on CPU); it is wrapped by the same relibra patch as
    verl's `MegatronEngineWithLMHead.forward_step`;
  * a plain SGD optimizer with Megatron's `step() -> (ok, grad_norm, zeros)` contract; only expert weights
    train (router, embedding and head are frozen, so no DP gradient reduction is needed).
The MoE layers are fp32; RELIBRA_TEST_BF16=1 builds them in bf16 (for measuring, not used by the tests).
"""
from __future__ import annotations

import functools
import types

import numpy as np
import torch

E, K, L_ALL, H, V = 8, 2, 2, 16, 32


def _cpu_platform():
    from verl.plugin.platform.platform_manager import set_platform

    from relibra_verl.patches.cpu_platform import platform_class

    set_platform(platform_class()())


def _cpu_schedules():
    import megatron.core.pipeline_parallel.schedules as sched

    real = sched.torch

    class _Torch:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def zeros(*a, **kw):
            if kw.get("device") == "cuda":
                kw["device"] = "cpu"
            return real.zeros(*a, **kw)

    sched.torch = _Torch()


def _setup(ep: int):
    import logging

    logging.getLogger("relibra_verl").setLevel(logging.ERROR)
    _cpu_platform()
    from relibra_verl.runtime.harness import init_megatron

    init_megatron(ep)
    _cpu_schedules()
    import relibra_verl.integration.plugin  # noqa: F401  (what `import verl` does through the entry point)
    from verl.workers.engine.megatron import transformer_impl as ti

    return ti


class _Chunk(torch.nn.Module):
    """embedding -> residual MoE layers -> head; the MoE layers are Megatron's."""

    def __init__(self, layers, config):
        super().__init__()
        from megatron.core.transformer.enums import ModelType

        self.layers = torch.nn.ModuleList(layers)
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        g = torch.Generator().manual_seed(7)
        self.register_buffer("emb", torch.randn(V, H, generator=g))
        self.register_buffer("head", torch.randn(H, V, generator=g) / H ** 0.5)

    def set_input_tensor(self, tensor):
        pass

    def zero_grad_buffer(self):
        pass

    def forward(self, ids):
        dtype = next(self.layers[0].experts.parameters()).dtype
        x = self.emb[ids].unsqueeze(1).to(dtype)
        for layer in self.layers:
            y, _ = layer(x)
            x = x + y
        return x.squeeze(1).float() @ self.head


class _SGD:
    def __init__(self, params, lr):
        self.params = list(params)
        self.opt = torch.optim.SGD(self.params, lr=lr)

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def step(self):
        norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None))
        self.opt.step()
        return True, float(norm), 0


class _BridgeStandIn:
    """Megatron-Bridge's export contract as verl's get_per_tensor_param uses it: a lazy generator of
    (hf_name, tensor); local expert i of EP rank k is named expert i + k * E / EP (as Megatron-Bridge does)."""

    export_weight_dtype = None

    def get_conversion_tasks(self, module):
        return None

    def export_hf_weights(self, module, conversion_tasks=None):
        from megatron.core import parallel_state as mpu

        rank, ep = mpu.get_expert_model_parallel_rank(), mpu.get_expert_model_parallel_world_size()
        S = E // ep
        for l, layer in enumerate(module[0].layers):
            for i, expert in enumerate(layer.experts.local_experts):
                for n, p in expert.named_parameters():
                    yield f"model.layers.{l}.mlp.experts.{rank * S + i}.{n}", p.detach()


def _engine_class(ti):
    from relibra_verl.patches.verl_engine import patch_engine_class

    class CPUTestEngine(ti.MegatronEngineWithLMHead):
        def forward_step(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func):
            from verl.utils.megatron.router_replay_utils import align_r3_router_replay_data

            from relibra_verl.runtime.harness import replay

            batch = next(batch_iter)
            input_ids = batch["input_ids"]
            routes = align_r3_router_replay_data(batch["routed_experts"], input_ids).values().clone()  # [T, L, K]
            # verl leaves each sequence's last row to the live router (R3 replay mask); here every row is
            # replayed, so that row gets a fixed legal route instead of verl's all-zero placeholder
            routes[input_ids.offsets()[1:] - 1] = torch.arange(K, dtype=routes.dtype)
            chunk = model[0] if isinstance(model, list) else model
            for l, layer in enumerate(chunk.layers):
                if self.enable_routing_replay:
                    replay(layer, routes[:, l].long())
                else:  # verl's ref engine: no router replay, the router routes live
                    layer.router.router_replay.clear_indices()
                    layer.router.router_replay.clear_router_replay_action()
            output = chunk(input_ids.values())
            return output, functools.partial(postprocess_micro_batch_func, data=batch)

        def postprocess_micro_batch_func(self, output, data, forward_only, loss_function):
            if loss_function is None:  # verl's infer_batch (log-probs): per-token log-probs of the next token
                ids = data["input_ids"]
                lp = torch.log_softmax(output.float(), -1).gather(-1, torch.roll(ids.values(), -1)[:, None])[:, 0]
                seqs = list(torch.split(lp, ids.offsets().diff().tolist()))
                nested = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
                return torch.tensor(1.0), {"loss": 1.0, "metrics": {}, "model_output": {"log_probs": nested}}
            loss = loss_function(output, data)
            return loss * data["num_micro_batch"], {"loss": loss.detach().item(), "metrics": {}}

    patch_engine_class(CPUTestEngine)  # the same relibra wrapper as MegatronEngineWithLMHead.forward_step
    return CPUTestEngine


def _loss(output, data):
    ids = data["input_ids"].values()
    mask = data["loss_mask"].values().float()
    labels = torch.roll(ids, -1)
    tok = torch.nn.functional.cross_entropy(output.float(), labels, reduction="none")
    return (tok * mask).sum() / data["batch_num_tokens"]


def build_engine(ti, relibra_cfg, seed: int = 0):
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.transformer_config import TransformerConfig

    from relibra_verl.runtime.harness import build_moe_layer

    import os
    dtype = torch.bfloat16 if os.environ.get("RELIBRA_TEST_BF16") == "1" else torch.float32
    layers = [build_moe_layer(E, K, hidden=H, ffn=8, seed=seed + l, dtype=dtype) for l in range(L_ALL)]
    for layer in layers:
        for p in layer.router.parameters():
            p.requires_grad_(False)
    tf = TransformerConfig(num_layers=L_ALL, hidden_size=H, num_attention_heads=1, num_moe_experts=E,
                           moe_router_topk=K, use_cpu_initialization=True,
                           expert_model_parallel_size=mpu.get_expert_model_parallel_world_size())
    chunk = _Chunk(layers, layers[0].config)
    eng = object.__new__(_engine_class(ti))
    ns = types.SimpleNamespace
    eng.engine_config = ns(context_parallel_size=1, dynamic_context_parallel=False, pad_bshd_to_minibatch_max=False,
                           use_remove_padding=True, use_fused_kernels=False, router_replay=ns(mode="R3"),
                           pad_to_length=False)
    eng.model_config = ns(mtp=ns(enable=False), model_type="language_model")
    eng.tf_config = tf
    eng.module = [chunk]
    eng.optimizer = _SGD([p for p in chunk.parameters() if p.requires_grad], lr=0.5)
    eng.enable_routing_replay = True
    eng.mini_layer_topk_idx_list = []
    eng.bridge, eng.vanilla_bridge, eng.peft_cls, eng._hf_export_tasks, eng._qat_enabled = (
        _BridgeStandIn(), False, None, None, False)
    eng.model_config.lora = {}
    if relibra_cfg is not None:
        from relibra_verl.integration.plugin import attach

        assert attach(eng, relibra_cfg) is not None
    return eng


def expert_weights(eng) -> dict:
    return {n: p.detach().numpy().copy() for n, p in eng.module[0].named_parameters() if p.requires_grad}


def run(rank: int, world: int, steps: int = 2) -> dict:
    """Two optimizer steps with relibra off, then on (same weights, same data): losses, metrics, weights."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from _data import v1_batch

    from relibra_verl.config import RelibraConfig

    ti = _setup(world)
    # profile none: on this toy model a time-aware planner would rightly make no replica (each GEMM call
    # costs more than the few tokens it could move), and this run is here to exercise the replica path
    cfg = RelibraConfig(enable=True, mode="both", replica_slots=1, gpus_per_node=world, reorder_every=1, profile="none")
    out = {}
    for name, rc in (("off", None), ("on", cfg)):
        eng = build_engine(ti, rc)
        losses, metrics = [], []
        for step in range(steps):
            data = v1_batch(100 * rank + step, 6, E, K, L_ALL, max_len=10, max_token_len=20, skew=1.5)
            res = eng.train_batch(data, _loss)
            losses.append(float(np.sum(res["loss"])))
            metrics.append({k: v for k, v in res["metrics"].items() if k.startswith("relibra/")})
        out[name] = {"losses": losses, "metrics": metrics, "weights": expert_weights(eng)}
        # weight export to the rollout engine (verl's real get_per_tensor_param; consumed lazily, as verl does)
        gen, _ = eng.get_per_tensor_param()
        out[name]["export"] = {n: t.numpy().copy() for n, t in gen}
        st = getattr(eng, "_relibra", None)
        if st is not None:
            out[name]["runtime"] = type(st.runtime).__name__ if st.runtime is not None else None
            out[name]["placement"] = None if st.runtime is None else np.asarray(st.runtime.expert_at_home).copy()
            if st.runtime is not None:
                m = st.runtime.metrics
                out[name]["replica_sync_bytes"] = m.replica_sync_bytes
                out[name]["runtime_fallbacks"] = m.fallback_micro_batches
    return out


def packed_rows_tp2(rank: int, world: int) -> dict:
    """TP 2 (sequence parallel split): this rank's rows of a micro-batch, as relibra counts them."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from _data import v1_batch

    _cpu_platform()
    from relibra_verl.runtime import cpu_compat

    cpu_compat.apply()
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(tensor_model_parallel_size=world)
    from relibra_verl.integration.microbatch import local_route_rows

    data = v1_batch(5, 5, E, K, L_ALL)  # the same data on both TP ranks, as in Megatron
    rows = local_route_rows(data, num_experts=E, moe_layers=np.arange(L_ALL), num_layers=L_ALL)
    return {"rows": rows, "lens": data["input_ids"].offsets().diff().tolist()}
