"""Markdown table of a bench/simulate_table.sh results folder: throughput vs megatron and vs ideal per
strategy, and relibra's throughput over each EPLB baseline's.

    .venv/bin/python bench/simulate_summary.py [bench/results/simulate] [--compare OTHER_DIR] [--compact]

--compare: a second folder made by the same script (e.g. under another cost model); adds its relibra /
eplb-oracle ratio beside this one's. --compact: the README's table (throughput vs megatron, relibra's share
of ideal, relibra over the best EPLB baseline).
"""
from __future__ import annotations

import argparse
import json
import os

CONFIGS = ("ep8", "ep16", "ep16_4k", "ep16_small", "qwen128", "qwen512", "v3_128", "v3_512")
BASELINES = ("eplb-periodic", "eplb-history", "eplb-oracle")


def load(folder: str) -> dict:
    out = {}
    for name in CONFIGS:
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
    return out


def label(report: dict) -> str:
    c = report["config"]
    src = "real traces" if not c.get("synthetic") else f"synthetic {c['model']}, {c['seqs']} seqs/step"
    mb = c["micro_batches_per_step"]
    return (f"{src}, EP {c['ep']} ({c['nodes']} x {c['gpus_per_node']}), {c['tokens_per_rank']} tok/rank, "
            f"micro-batches {mb}")


def short_label(report: dict) -> str:
    c = report["config"]
    src = "real" if not c.get("synthetic") else {"qwen3-30b-a3b": "Qwen3-30B-A3B", "deepseek-v3": "DeepSeek-V3"}.get(
        c["model"], c["model"])
    size = f"{c['resample']} seqs" if not c.get("synthetic") else f"{c['seqs']} seqs"
    M = c["micro_batches_per_step"][0]
    return f"{src}, EP {c['ep']} ({c['nodes']} x {c['gpus_per_node']}), {size}, {c['tokens_per_rank']} tok/rank, {M} mb/step"


def compact(runs: dict) -> None:
    print("| configuration | " + " | ".join(BASELINES) + " | relibra (of ideal) | ideal | relibra / best EPLB |")
    print("|---|" + "---|" * (len(BASELINES) + 3))
    for r in runs.values():
        s = r["timing"]["strategies"]
        best = min(s[b]["step_time_s"] for b in BASELINES if b in s)
        rel = s["relibra"]
        print(f"| {short_label(r)} | " + " | ".join(f"{s[b]['throughput_vs_megatron']:.2f}" for b in BASELINES)
              + f" | **{rel['throughput_vs_megatron']:.2f}** ({rel['throughput_vs_ideal']:.3f}) | "
              f"{s['ideal']['throughput_vs_megatron']:.2f} | x{best / rel['step_time_s']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", nargs="?", default="bench/results/simulate")
    p.add_argument("--compare", default=None)
    p.add_argument("--compact", action="store_true")
    args = p.parse_args()
    runs = load(args.folder)
    if args.compact:
        return compact(runs)
    other = load(args.compare) if args.compare else {}
    names = ["megatron", *BASELINES, "relibra", "ideal"]
    head = "| configuration | " + " | ".join(names) + " | relibra / " + " | relibra / ".join(BASELINES) + " |"
    if other:
        head += " relibra / eplb-oracle (compare) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for key, r in runs.items():
        s = r["timing"]["strategies"]
        cells = [f"{s[n]['throughput_vs_megatron']:.2f} / {s[n]['throughput_vs_ideal']:.3f}" if n in s else "-" for n in names]
        ratios = [f"x{s[b]['step_time_s'] / s['relibra']['step_time_s']:.3f}" if b in s else "-" for b in BASELINES]
        row = f"| {label(r)} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |"
        if other:
            o = other.get(key, {}).get("timing", {}).get("strategies", {})
            row += (f" x{o['eplb-oracle']['step_time_s'] / o['relibra']['step_time_s']:.3f} |"
                    if "eplb-oracle" in o and "relibra" in o else " - |")
        print(row)


if __name__ == "__main__":
    main()
