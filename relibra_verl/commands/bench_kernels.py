"""`relibra-verl bench-kernels --device cpu|cuda [--json PATH]`: check and benchmark the dispatch kernels.

cpu:  every kernel under Triton's interpreter against its torch reference (fp32/fp16); exit 1 on mismatch.
cuda: bf16/fp32 checks, then timings against Megatron-Core's permute/unpermute and a torch argsort
      implementation, and the card's copy bandwidth (see relibra_verl.kernels.benchmark); exit 1 on mismatch.
Also runnable without the package installed: `python -m relibra_verl.commands.bench_kernels ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from relibra_verl.errors import UsageError

DESCRIPTION = ("Check the dispatch kernels against their torch references (cpu: under Triton's interpreter) "
               "and, on cuda, benchmark them against Megatron-Core and torch; exit 1 on any mismatch.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), required=True,
                   help="cpu: interpreter checks only; cuda: checks and benchmarks")
    p.add_argument("--json", metavar="PATH", help="write the report (card, date, versions, results) here")
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized inputs (default 0)")
    p.add_argument("--sizes", metavar="T[,T...]", help="cuda only: token counts to benchmark "
                   "(default 4096,16384,65536)")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-kernels", help="check (and on cuda, benchmark) the dispatch kernels",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise UsageError(f"--json: folder {parent} does not exist")
    if args.device == "cpu":
        # kernels build their interpreted variant lazily, so setting this here is enough
        os.environ["TRITON_INTERPRET"] = "1"
        from relibra_verl.kernels import HAVE_TRITON, benchmark

        if not HAVE_TRITON:
            raise UsageError("--device cpu runs the Triton kernels in Triton's interpreter: install triton")
        if args.sizes:
            raise UsageError("--sizes applies to --device cuda only")
        report = benchmark.run_cpu(seed=args.seed)
    else:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False); "
                             "use --device cpu for the interpreter checks")
        from relibra_verl.kernels import benchmark

        sizes = benchmark.BENCH_T
        if args.sizes:
            try:
                sizes = tuple(int(s) for s in args.sizes.split(","))
            except ValueError:
                raise UsageError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
            if any(s < 1 for s in sizes):
                raise UsageError("--sizes must be positive")
        report = benchmark.run_cuda(seed=args.seed, Ts=sizes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
            f.write("\n")
    bad = [r for r in report["checks"] if not r["ok"]]
    print(f"bench-kernels {args.device}: {len(report['checks']) - len(bad)}/{len(report['checks'])} checks passed"
          + ("" if report["ok"] else "; MISMATCH"))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_kernels", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"bench-kernels: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
