"""Run Megatron-Core 0.19.2's MoE layer and optimizers on CPU (gloo), for tests and `relibra-verl verify`.

Megatron assumes CUDA in five places of the MoE path (see ../shared/cpu-stack.md): the RNG tracker,
`current_device()` used as a device, the dispatcher's DtoH stream, split sizes left as tensors for CPU
tensors, and uneven all-gathers under TP. Its optimizers (`get_megatron_optimizer`, DistributedOptimizer,
Float16OptimizerWithFloat16Params) add two more (megatron/core, 0.19.2):
6. `device='cuda'` literals for scalar bookkeeping tensors: optimizer/optimizer.py:315 (grad-norm group
   flag), :690 (found_inf), :698 (overflow buffer), :702 (`_scale_one`, every MixedPrecisionOptimizer:
   the first failure), :1249 (FP32Optimizer), optimizer/clip_grads.py:96, :108, :112, :180, :231.
7. dtype dispatch by CUDA type name: `param.type() in ['torch.cuda.HalfTensor',
   'torch.cuda.BFloat16Tensor']` / `== 'torch.cuda.FloatTensor'`, else TypeError:
   optimizer/distrib_optimizer.py:401, :466 (main-param groups), :758 (`main_param` fields),
   optimizer/optimizer.py:1009, :1028 (Float16Optimizer), optimizer/clip_grads.py:174 (assert).
   (DDP's buffers and the gloo reduce-scatter / all-gather of the distributed optimizer run unchanged.)
`apply()` adapts them in this process only when CUDA is absent, so GPU runs never see a change: 6 by giving
those three modules a `torch` whose tensor factories map a CUDA device to the CPU, 7 by letting `.type()`
report the CUDA name of a CPU tensor only while the listed functions run. Call it in each rank process
before building Megatron modules.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False


class _NoStream:
    """Stands in for torch.cuda.Stream / Event on CPU: every operation is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NoStream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def apply() -> bool:
    """Adapt Megatron for CPU if CUDA is unavailable. Returns True when the adaptations are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    import megatron.core.tensor_parallel.mappings as mappings
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    # 2. `torch.cuda.current_device()` is used as a device argument.
    torch.cuda.current_device = lambda: "cpu"
    # 3. Streams and events of the dispatcher (DtoH copies) become no-ops.
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()

    # 1. The model-parallel RNG tracker keeps CUDA generator states: use the CPU generator instead.
    def _get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: None  # the CPU seed is set by the caller
    torch.cuda.manual_seed_all = lambda seed: None

    # 4. Split sizes must reach all_to_all_single as lists, also for CPU tensors.
    orig_move = moe_utils.maybe_move_tensor_to_cpu

    def _move(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return orig_move(tensor, as_numpy=as_numpy, record_stream=False)

    moe_utils.maybe_move_tensor_to_cpu = _move
    token_dispatcher.maybe_move_tensor_to_cpu = _move

    # 5. TP > 1 gathers uneven splits, which gloo refuses: pad, gather, slice.
    orig_gather = mappings._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None:
            return orig_gather(input_, group, None, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = orig_gather(padded, group, None, use_global_buffer)
        return torch.cat([out[i * width : i * width + s] for i, s in enumerate(sizes)])

    mappings._gather_along_first_dim = _gather_along_first_dim

    _adapt_optimizers()
    _APPLIED = True
    return True


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return "cpu"
    return device


class _CpuTorch:
    """`torch` as seen by Megatron's optimizer modules on CPU: factories asked for CUDA build on the CPU
    (adaptation 6); every other attribute is torch's own."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return attr(*args, **kwargs)

        return factory


@contextlib.contextmanager
def _cuda_type_names():
    """While active, `t.type()` of a CPU tensor reports the CUDA type name (adaptation 7). Scoped to the
    Megatron functions that branch on it, so nothing else in the process sees a changed `.type()`."""
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and not self.is_cuda:
            return orig(self).replace("torch.", "torch.cuda.", 1)
        return orig(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = orig


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def _adapt_optimizers() -> None:
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as mutils

    for mod in (optimizer, clip_grads, mutils):
        mod.torch = _CpuTorch()
    dopt = distrib_optimizer.DistributedOptimizer
    dopt.__init__ = _with_cuda_type_names(dopt.__init__)  # :758 and, through it, :401/:466
    f16 = optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _with_cuda_type_names(f16.__init__)
    wrapped = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    for mod in (clip_grads, optimizer, distrib_optimizer):  # imported by name there
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = wrapped
