"""Grouped expert GEMM with and without replica groups (bench/gpu_check.sh step 4).

What relibra's grouped-experts runtime does per MoE layer call: one grouped GEMM over the S home experts plus
R replica groups (runtime/grouped.py). This measures, for the same tokens, the expert MLP (fc1 -> GELU -> fc2,
forward) as
  home        one grouped call over S groups, every token at home (Megatron without replicas);
  groups      one grouped call over S + R groups, part of the tokens moved to replica groups (relibra);
  extra_calls one grouped call over S groups + one GEMM call per replica (a replica as a separate call).
The grouped GEMM is `torch._grouped_mm` where this torch and GPU offer it (bf16, CUDA), else a loop of
matmuls (the CPU stand-in of the torch grouped linear); the JSON names which one ran.

    python bench/grouped_gemm.py --out grouped_gemm.json            # GPU: Qwen3-30B-A3B-like expert shape
    python bench/grouped_gemm.py --dry-run --out grouped_gemm.json  # CPU: tiny shapes, checks the script runs
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from calibrate_gpu import timer  # bench/ is the script's directory: on sys.path


def grouped_mm_impl(device: str, dtype: torch.dtype):
    """(name, fn(x [N, in], w [G, out, in], splits list) -> [N, out]) for this device."""
    def loop(x, w, splits):
        return torch.cat([xi @ w[i].t() for i, xi in enumerate(torch.split(x, splits))])

    gmm = getattr(torch, "_grouped_mm", None)
    if device != "cuda" or gmm is None or dtype != torch.bfloat16:
        return "matmul loop", loop

    def grouped(x, w, splits):
        offs = torch.tensor(splits, device=x.device, dtype=torch.int32).cumsum(0).to(torch.int32)
        return gmm(x, w.transpose(1, 2), offs=offs)

    try:  # not every GPU/torch build has a kernel for it: say which one ran, never switch silently later
        x = torch.randn(64, 128, device=device, dtype=dtype)
        w = torch.randn(2, 64, 128, device=device, dtype=dtype)
        torch.testing.assert_close(grouped(x, w, [32, 32]), loop(x, w, [32, 32]), atol=1e-1, rtol=2e-2)
        return "torch._grouped_mm", grouped
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        return f"matmul loop (torch._grouped_mm failed: {type(exc).__name__})", loop


def mlp(gmm, x, w1, w2, splits):
    return gmm(torch.nn.functional.gelu(gmm(x, w1, splits)), w2, splits)


def run(tokens: int, S: int, R: int, H: int, F: int, share: float, device: str, dtype, reps: int) -> dict:
    """tokens routed pairs on one rank over S home experts; R replicas take `share` of the first R experts'
    tokens (the hot experts a plan would replicate)."""
    name, gmm = grouped_mm_impl(device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    w1 = (torch.randn(S, F, H, generator=gen) * H ** -0.5).to(device, dtype)
    w2 = (torch.randn(S, H, F, generator=gen) * F ** -0.5).to(device, dtype)
    w1r, w2r = torch.cat([w1, w1[:R]]), torch.cat([w2, w2[:R]])  # replica k holds home expert k's weights
    x = torch.randn(tokens, H, generator=gen).to(device, dtype)
    home = [tokens // S] * S
    home[0] += tokens - sum(home)
    moved = [int(home[i] * share) for i in range(R)]
    rest = [h - (moved[i] if i < R else 0) for i, h in enumerate(home)]
    # the same tokens with relibra's layout: each expert's first rows stay home, its last rows go to its replica
    starts = [sum(home[:i]) for i in range(S)]
    perm = torch.cat([torch.arange(starts[i], starts[i] + rest[i]) for i in range(S)]
                     + [torch.arange(starts[k] + rest[k], starts[k] + home[k]) for k in range(R)]).to(device)
    xr = x[perm]
    n_home = sum(rest)
    cases = {
        "home": lambda: mlp(gmm, x, w1, w2, home),
        "groups": lambda: mlp(gmm, xr, w1r, w2r, rest + moved),
        "extra_calls": lambda: torch.cat([mlp(gmm, xr[:n_home], w1, w2, rest)] + [
            mlp(gmm, xr[n_home + sum(moved[:k]):n_home + sum(moved[:k + 1])], w1[k:k + 1], w2[k:k + 1], [moved[k]])
            for k in range(R)]),
    }
    ref = cases["home"]().float()[perm]
    out = {"grouped_gemm": name, "tokens": tokens, "S": S, "R": R, "hidden": H, "ffn": F,
           "replica_share": share, "splits_groups": rest + moved, "ms": {}, "max_rel_diff_vs_home": {}}
    for key, fn in cases.items():
        out["ms"][key] = timer(torch, device)(fn, reps) * 1e3
        y = fn().float()
        y = y[perm] if key == "home" else y  # compare row for row in relibra's layout
        out["max_rel_diff_vs_home"][key] = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON report path")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (checks the script only)")
    args = p.parse_args()
    if args.dry_run:
        device, dtype, shapes, reps = "cpu", torch.float32, [(512, 4, 2, 64, 32)], 3
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --dry-run)")
        # Qwen3-30B-A3B experts (hidden 2048, moe ffn 768), 128 experts over EP 16 -> S = 8; DeepSeek-V3-like
        # (7168, 2048), 256 experts over EP 32 -> S = 8
        device, dtype, reps = "cuda", torch.bfloat16, 20
        shapes = [(t, 8, 2, 2048, 768) for t in (8192, 32768)] + [(t, 8, 2, 7168, 2048) for t in (8192, 32768)]
    results = [run(t, S, R, H, F, 0.5, device, dtype, reps) for t, S, R, H, F in shapes]
    for r in results:
        ms = r["ms"]
        print(f"grouped GEMM ({r['grouped_gemm']}) T={r['tokens']} S={r['S']} R={r['R']} H={r['hidden']} "
              f"F={r['ffn']}: home {ms['home']:.3f} ms, S+R groups {ms['groups']:.3f} ms, "
              f"S groups + {r['R']} calls {ms['extra_calls']:.3f} ms")
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    bad = [r for r in results for v in r["max_rel_diff_vs_home"].values() if not v <= (2e-2 if device == "cuda" else 1e-5)]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
