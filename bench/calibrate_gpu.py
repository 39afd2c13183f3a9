"""Measure this GPU's cost-model constants and write a hardware profile (relibra_verl.sim.profiles).

    python bench/calibrate_gpu.py --out relibra_verl/data/profiles/h100-measured.json [--base h100-ib400]
    python bench/calibrate_gpu.py --dry-run --out /tmp/p.json      # CPU: small shapes, checks the code path

Measures (bf16 on CUDA, median of CUDA-event timings after warm-up):
  gemm_fit[preset]   one routed SwiGLU expert (x @ W_gate_up [H, 2I], silu(gate) * up, @ W_down [I, H]) at
                     tokens per expert M in --tokens, each preset's H and I; least-squares fit
                     t(M) = a + b * M (facts.md: expert time is a + b*tokens; fit a and b on a GPU), weighted
                     by 1/t so small M counts. Also the backward/forward ratio at the largest M.
  gemm_tflops        an 8192^3 bf16 matmul (facts.md measured 798 TFLOP/s on an H100 in this workplace).
  hbm_GBps           device-to-device copy of a 1 GiB buffer, bytes read + written per second (facts.md's
                     convention: ~3.0 TB/s on H100).
  dense_tflops       gemm_tflops x the base profile's dense/gemm ratio (attention is not measured here).
Links (NVLink, InfiniBand) are not measured by this script: they come from the base profile.
The output is a profile file: `relibra-verl simulate --profile PATH` reads it; `base` fills the rest.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from relibra_verl.sim.presets import PRESETS  # noqa: E402
from relibra_verl.sim.profiles import BUILTIN, load_profile  # noqa: E402

TOKENS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def timer(torch, device):
    """fn -> median seconds of `reps` runs (CUDA events on GPU, perf_counter on CPU)."""
    def run(fn, reps, warmup=3):
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(reps):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                out.append(a.elapsed_time(b) * 1e-3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return statistics.median(out)
    return run


def fit_ab(tokens, seconds) -> tuple[float, float]:
    """Weighted least squares t = a + b*M (weights 1/t: relative error). Returns (a s, b s/token), both >= 0."""
    M = np.asarray(tokens, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    w = 1.0 / t
    A = np.stack([np.ones_like(M), M], axis=1) * w[:, None]
    (a, b), *_ = np.linalg.lstsq(A, t * w, rcond=None)
    if a < 0:  # force through the origin
        a, b = 0.0, float((M * t).sum() / (M * M).sum())
    return float(a), float(max(b, 0.0))


def expert_times(torch, device, dtype, H, I, tokens, reps, run):
    """Forward and forward+backward seconds of one SwiGLU expert at each tokens-per-expert M."""
    w1 = torch.randn(H, 2 * I, device=device, dtype=dtype, requires_grad=True) * 0.02
    w2 = torch.randn(I, H, device=device, dtype=dtype, requires_grad=True) * 0.02
    w1, w2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
    fwd, both = [], []
    for M in tokens:
        x = torch.randn(M, H, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(M, H, device=device, dtype=dtype)

        def f():
            g, u = (x @ w1).chunk(2, dim=-1)
            return (torch.nn.functional.silu(g) * u) @ w2

        def fb():
            f().backward(gy)

        with torch.no_grad():
            fwd.append(run(f, reps))
        both.append(run(fb, reps))
    return fwd, both


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="profile file to write (JSON)")
    p.add_argument("--base", default="h100-ib400", choices=sorted(BUILTIN), help="profile for the constants not measured")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: all)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per expert to time")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, shapes / 16, 2 token sizes: a code-path check")
    args = p.parse_args(argv)

    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("calibrate_gpu: no CUDA device (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    scale = 16 if dry else 1
    tokens = [16, 64] if dry else [int(t) for t in args.tokens.split(",")]
    reps = 2 if dry else args.reps
    run = timer(torch, device)
    base = BUILTIN[args.base]
    card = "cpu (dry run)" if dry else torch.cuda.get_device_name()
    t_start = time.time()

    # 1. large bf16 matmul
    n = 512 if dry else 8192
    a_ = torch.randn(n, n, device=device, dtype=dtype)
    b_ = torch.randn(n, n, device=device, dtype=dtype)
    gemm_tflops = 2 * n ** 3 / run(lambda: a_ @ b_, reps) / 1e12
    del a_, b_

    # 2. HBM copy, bytes read + written
    nbytes = (64 << 20) if dry else (1 << 30)
    src = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    hbm_GBps = 2 * nbytes / run(lambda: dst.copy_(src), reps) / 1e9
    del src, dst

    # 3. expert GEMM a + b*M per preset
    fits = {}
    for name in [s.strip() for s in args.presets.split(",") if s.strip()]:
        m = PRESETS[name]
        H, I = m.hidden // scale, m.moe_intermediate // scale
        fwd, both = expert_times(torch, device, dtype, H, I, tokens, reps, run)
        a, b = fit_ab(tokens, fwd)
        fits[name] = {
            "a_us": a * 1e6, "b_ns_per_token": b * 1e9,
            "bwd_over_fwd_at_max_tokens": (both[-1] - fwd[-1]) / fwd[-1],
            "points": [{"tokens": M, "fwd_us": f * 1e6, "fwd_bwd_us": fb * 1e6} for M, f, fb in zip(tokens, fwd, both)],
            "shape": {"H": H, "I": I, "dtype": str(dtype).replace("torch.", "")},
        }
        print(f"{name:<18} H={H} I={I}: a = {a * 1e6:7.2f} us, b = {b * 1e9:7.3f} ns/token "
              f"({2 * 3 * H * I / b / 1e12 if b else float('nan'):.3g} TFLOP/s at large M), "
              f"bwd/fwd {fits[name]['bwd_over_fwd_at_max_tokens']:.2f}", flush=True)

    today = datetime.date.today().isoformat()
    profile = {
        "base": args.base,
        "name": f"{card.lower().replace(' ', '-')}-{today}",
        "gemm_tflops": float(f"{gemm_tflops:.4g}"),
        "hbm_GBps": float(f"{hbm_GBps:.4g}"),
        "dense_tflops": float(f"{gemm_tflops * base['dense_tflops'] / base['gemm_tflops']:.4g}"),
        "gemm_fit": fits,
        "source": f"bench/calibrate_gpu.py on {card}, {today}, torch {torch.__version__}, host {platform.node()}; "
                  f"links from {args.base}",
    }
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=2)
    load_profile(args.out)  # the file must load as a profile
    print(f"gemm {gemm_tflops:.0f} TFLOP/s, HBM copy {hbm_GBps:.0f} GB/s; wrote {args.out} "
          f"({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
