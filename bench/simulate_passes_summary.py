"""Print the whole-trainer-step table from bench/simulate_passes.sh's JSON reports (markdown).

Each cell: whole-step throughput relative to megatron (relibra's with its forward passes balanced and
unbalanced, and its share of ideal), beside relibra's update-only figure (the step-time table's). Usage: python bench/simulate_passes_summary.py [DIR]
"""
from __future__ import annotations

import json
import pathlib
import sys

ORDER = ["ep8", "ep16", "ep16_4k", "ep16_small", "qwen128", "qwen512", "v3_128", "v3_512"]


def label(cfg: dict) -> str:
    src = "real" if not cfg.get("synthetic") else cfg["model"]
    seqs = cfg["seqs"] if cfg.get("synthetic") else cfg["resample"]
    return (f"{src}, EP {cfg['ep']} ({cfg['nodes']} x {cfg['gpus_per_node']}), {seqs} seqs, "
            f"{cfg['tokens_per_rank']} tok/rank, {cfg['micro_batches_per_step'][0]} mb/step")


def main(d: str) -> None:
    root = pathlib.Path(d)
    print("| configuration | update share of megatron's step | relibra, update pass alone | eplb-periodic | "
          "eplb-history | eplb-oracle | relibra, fwd unbalanced | relibra, fwd balanced (of ideal) | ideal | "
          "relibra / best EPLB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ORDER:
        p = root / f"{name}.json"
        if not p.exists():
            continue
        r = json.loads(p.read_text())
        ws = r["timing"]["whole_step"]
        s, u = ws["strategies"], ws["forward_unbalanced"]
        m = s["megatron"]
        share = m["update_s"] / m["step_time_s"]
        t = lambda n: s[n]["throughput_vs_megatron"] if n in s else None  # noqa: E731
        best = max(t(n) for n in ("eplb-periodic", "eplb-history", "eplb-oracle") if n in s)
        f = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        alone = r["timing"]["strategies"]["relibra"]["throughput_vs_megatron"]
        print(f"| {label(r['config'])} | {share:.2f} | {f(alone)} | {f(t('eplb-periodic'))} | {f(t('eplb-history'))} | "
              f"{f(t('eplb-oracle'))} | {f(u['relibra']['throughput_vs_megatron'])} | "
              f"**{f(t('relibra'))}** ({s['relibra']['throughput_vs_ideal']:.3f}) | {f(t('ideal'))} | "
              f"x{t('relibra') / best:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/simulate_passes")
