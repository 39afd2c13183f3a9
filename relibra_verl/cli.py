"""`relibra-verl` command line: one subcommand per module in relibra_verl.commands.

Each command module defines `register(subparsers)` which adds its parser and sets `func(args) -> int`.
User errors (bad traces, bad flags, unknown presets) raise `UsageError` and exit with status 2 and one
line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from relibra_verl.errors import UsageError

# Order is the order of `relibra-verl --help`.
COMMAND_MODULES = ("simulate", "bench_planner", "verify", "bench_kernels", "synth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relibra-verl",
        description="Routing-replay-guided expert load balancing for MoE RL training (veRL + Megatron).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"relibra_verl.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"relibra_verl.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"relibra-verl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
