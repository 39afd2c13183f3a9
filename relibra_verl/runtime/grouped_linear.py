"""A plain-torch grouped linear with Transformer Engine's `GroupedLinear` interface, for Megatron's real
`TEGroupedMLP` on machines without Transformer Engine (CPU tests, `relibra-verl verify --experts grouped`).

Megatron-Core 0.19.2 builds `TEGroupedMLP` from its module spec's `GroupedMLPSubmodules(linear_fc1,
linear_fc2)`; with Transformer Engine these are `TEColumnParallelGroupedLinear` / `TERowParallelGroupedLinear`
(megatron/core/extensions/transformer_engine.py). `TorchColumnGroupedLinear` / `TorchRowGroupedLinear` take
their place with the same constructor keywords and the parts of TE's interface that `TEGroupedMLP` and relibra
use:

* parameters `weight{i}` [out, in] (and `bias{i}` [out]) for i < `num_gemms`, marked like Megatron marks
  TE's (`allreduce=False` under expert parallelism, `tensor_model_parallel` by parallel mode);
* `forward(x [N, in], m_splits: list[int] of num_gemms) -> (out [N, out], bias)`: rows split by group, group i
  multiplied by `weight{i}`; bias added (or returned per group when `skip_bias_add`, as TE's `return_bias`);
* the groups are read as `getattr(self, f"weight{i}") for i in range(self.num_gemms)`, as TE's GroupedLinear
  reads them, which is how relibra appends replica groups to the same call (runtime/moe.py,
  `_extra_groups`).

The GEMM itself is a loop of matmuls: a stand-in for TE's grouped GEMM kernel with the same arithmetic per
group, not a fast path. Expert tensor parallelism is not supported (relibra refuses it anyway).
"""
from __future__ import annotations

import torch


class _TorchGroupedLinear(torch.nn.Module):
    parallel_mode: str | None = None

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method, bias: bool,
                 skip_bias_add: bool, is_expert: bool = False, tp_comm_buffer_name=None, pg_collection=None,
                 name=None):
        super().__init__()
        if not is_expert:
            raise ValueError("a grouped linear only holds experts (is_expert=True), as TEGroupedLinear")
        tp = getattr(pg_collection, "expt_tp", None) if pg_collection is not None else None
        if tp is not None and tp.size() > 1:
            raise ValueError("the torch grouped linear does not support expert tensor parallelism")
        self.config = config
        self.num_gemms = num_gemms
        self.in_features, self.out_features = input_size, output_size
        self.use_bias = bias
        self.return_bias = skip_bias_add and bias
        dtype = config.params_dtype
        for i in range(num_gemms):
            w = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=dtype))
            with torch.no_grad():
                init_method(w)
            self.register_parameter(f"weight{i}", w)
            if bias:
                self.register_parameter(f"bias{i}", torch.nn.Parameter(torch.zeros(output_size, dtype=dtype)))
        from megatron.core.extensions.transformer_engine import _set_expert_parameter_attributes

        use_expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        _set_expert_parameter_attributes(self, self.parallel_mode, use_expert_pgs)

    def forward(self, x: torch.Tensor, m_splits):
        splits = [int(s) for s in m_splits]
        if len(splits) != self.num_gemms or sum(splits) != x.shape[0]:
            raise ValueError(f"m_splits {splits} must have {self.num_gemms} entries summing to {x.shape[0]} rows")
        weights = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        biases = [getattr(self, f"bias{i}") for i in range(self.num_gemms)] if self.use_bias else None
        outs = []
        for i, xi in enumerate(torch.split(x, splits)):
            y = torch.matmul(xi, weights[i].t())
            if biases is not None and not self.return_bias:
                y = y + biases[i]
            outs.append(y)
        out = torch.cat(outs) if outs else x.new_zeros((0, self.out_features))
        return out, (biases if self.return_bias else None)


class TorchColumnGroupedLinear(_TorchGroupedLinear):
    """Stands in for `TEColumnParallelGroupedLinear` (TEGroupedMLP's linear_fc1)."""

    parallel_mode = "column"


class TorchRowGroupedLinear(_TorchGroupedLinear):
    """Stands in for `TERowParallelGroupedLinear` (TEGroupedMLP's linear_fc2)."""

    parallel_mode = "row"


def grouped_moe_spec():
    """Megatron's MoELayer builder with real `TEGroupedMLP` experts over the torch grouped linears."""
    from functools import partial

    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

    experts = partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(linear_fc1=TorchColumnGroupedLinear,
                                                                    linear_fc2=TorchRowGroupedLinear))
    return partial(MoELayer, submodules=MoESubmodules(experts=experts, shared_experts=None))
