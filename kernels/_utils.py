"""Shared launch helpers: backend choice, one kernel body for CUDA and for Triton's interpreter, checks.

Backends: "triton" (the kernels; on CPU tensors only under Triton's interpreter, TRITON_INTERPRET=1),
"torch" (the plain-torch references, also the fallback), "auto" (Triton on CUDA tensors, torch otherwise:
the interpreter is never chosen implicitly, it is ~1000x slower than the reference).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)

    HAVE_TRITON = True
except ImportError:  # the torch references still work
    import types

    triton = None
    tl = types.SimpleNamespace(constexpr=int)  # lets the kernel signatures be defined; never launched
    HAVE_TRITON = False

BACKENDS = ("auto", "triton", "torch")

# Kernels sum with `tl.reduce(x, axis, tl.standard._sum_combine)` rather than `tl.sum`, and use tl.full, not
# tl.zeros: those are jit functions themselves, built compiled or interpreted once, when triton is imported,
# so an interpreted kernel calling them fails unless TRITON_INTERPRET=1 was set before that import. The
# interpreter recognises this combine function (numpy sum); compiled code gets what tl.sum lowers to.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" | "triton" | "torch" and the tensors' device -> "triton" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAVE_TRITON) else "torch"
    if not HAVE_TRITON:
        raise ValueError("backend='triton' needs the triton package, which is not importable")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError("backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
                             "(or use backend='torch'/'auto')")
        return "triton"
    raise ValueError(f"backend='triton' supports cuda and cpu (interpreter) tensors, got device {device}")


class TritonKernel:
    """One kernel body, compiled for CUDA tensors or run by Triton's interpreter for CPU tensors.

    Both variants are built lazily from the plain function, so the choice does not depend on whether
    TRITON_INTERPRET was set before this module (or triton) was first imported.
    """

    def __init__(self, fn):
        self.fn = fn
        self._compiled = None
        self._interpreted = None

    def on(self, device: torch.device):
        if device.type == "cpu":
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ---- argument checks (shapes, dtypes, layout: no device sync) ----

def check_tensor(name: str, t, *, ndim: int, kind: str, device: torch.device | None = None) -> None:
    """kind: "int" (any integer dtype but bool) or "float" (fp32/fp16/bf16)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if kind == "int":
        if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
            raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    elif kind == "float":
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)})")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")


def check_int(name: str, value, *, low: int, none_ok: bool = False) -> None:
    """A Python int >= low (low 0: non-negative, 1: positive; bool refused), or None when none_ok."""
    if none_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        raise ValueError(f"{name} must be {what}{' or None' if none_ok else ''}, got {value!r}")


def raise_failed(checks: list[tuple[str, torch.Tensor]]) -> None:
    """Evaluate several on-device boolean checks with one host sync; raise on the first that fails.

    checks: (message, 0-d bool tensor that is True when the check passes).
    """
    if not checks:
        return
    ok = torch.stack([c.reshape(()) for _, c in checks]).tolist()
    for (msg, _), good in zip(checks, ok):
        if not good:
            raise ValueError(msg)


def int_range(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """0-d bool: every element of integer tensor t lies in [lo, hi)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    mn, mx = torch.aminmax(t.to(torch.int64) if t.dtype == torch.uint8 else t)
    return (mn >= lo) & (mx < hi)
