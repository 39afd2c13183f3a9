"""Run Megatron-Core 0.19.2's MoE layer on CPU (gloo), for tests and `relibra-verl verify`.

Megatron assumes CUDA in five places (see ../shared/cpu-stack.md): the RNG tracker, `current_device()`
used as a device, the dispatcher's DtoH stream, split sizes left as tensors for CPU tensors, and uneven
all-gathers under TP. `apply()` adapts them in this process only when CUDA is absent, so GPU runs never
see a change. Call it in each rank process before building Megatron modules.
"""
from __future__ import annotations

import contextlib

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
    _APPLIED = True
    return True
