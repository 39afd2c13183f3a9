"""relibra-locality with the workers' expert-node hint followed (plan_relibra's preferred_node, what the verl
workers do) or ignored (the co-placed data meets experts placed for balance alone): what the hint is worth.

  python bench/locality_hint.py {followed|ignored} OUT.json SIMULATE-ARGS...
  e.g. python bench/locality_hint.py ignored /tmp/ignored.json --synthetic --model deepseek-v2-lite --seqs 512 \
       --mean-len 300 --steps 3 --ep 16 --gpus-per-node 8 --tokens-per-rank 4096 \
       --strategies relibra,relibra-locality --locality-min-gain=-inf

Runs `relibra-verl simulate ARGS --json OUT.json`; with `ignored`, relibra-locality plans without the hint.
"""
import sys

from relibra_verl.cli import main
from relibra_verl.planner import strategies


def run(variant: str, out: str, args: list[str]) -> int:
    if variant not in ("followed", "ignored"):
        raise SystemExit(f"variant must be followed or ignored, got {variant!r}")
    planned = strategies._relibra

    def without_hint(counts, topo, mode, prev, replication, reorder, preferred_node=None):
        return planned(counts, topo, mode, prev, replication, reorder)

    if variant == "ignored":
        strategies._relibra = without_hint
    return main(["simulate", *args, "--json", out, "--no-progress"])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
