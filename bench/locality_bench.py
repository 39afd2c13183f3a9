"""Time the co-placement planner (relibra_verl.planner.locality) at a real model's scale.

  python bench/locality_bench.py [--seqs 2048] [--layers 48] [--experts 128] [--topk 8] [--ep 32]
                                 [--gpus-per-node 8] [--domains 4] [--mini-batches 4]

Defaults: Qwen3-30B-A3B's MoE shape (48 layers, 128 experts, top-8) on EP 32 (4 nodes x 8). The usage is
synthetic: `--domains` domains, each with its own Zipf popularity of the experts of every layer, sequence
lengths log-normal around 1,500 tokens; verl's ranks are a round robin. Prints the planner's wall time
(one CPU core with OMP_NUM_THREADS=1), the inter-node shares and whether it fell back, and the time the
driver takes to count every sequence's routes (uint8, as vLLM returns them) into its usage, as JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from relibra_verl.planner.locality import count_routed_pairs, plan_locality


def synthetic_usage(seqs, layers, experts, topk, domains, seed=0):
    """[S, L, E] pairs and [S] lengths: each domain's own Zipf popularity per layer."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(np.log(1500), 0.6, size=seqs), 64, 8192).astype(np.int64)
    domain = np.arange(seqs) % domains
    usage = np.zeros((seqs, layers, experts), np.int32)
    zipf = 1.0 / np.arange(1, experts + 1) ** 1.1
    for d in range(domains):
        idx = np.flatnonzero(domain == d)
        for l in range(layers):
            p = zipf[rng.permutation(experts)]
            usage[idx, l] = rng.multinomial(lens[idx] * topk, p / p.sum())
    return usage, lens


def time_counting(lens, layers, experts, topk, seed=1):
    """Seconds to count the routes of sequences of these lengths: one random [max len, L, K] uint8 array,
    each sequence counted on its first `len` tokens (what the driver does per sequence)."""
    routes = np.random.default_rng(seed).integers(0, experts, size=(int(lens.max()), layers, topk), dtype=np.uint8)
    count_routed_pairs(routes[:1])                                            # compile / load the cache
    t0 = time.perf_counter()
    for n in lens:
        count_routed_pairs(routes[:n])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--ep", type=int, default=32)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--mini-batches", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    usage, lens = synthetic_usage(a.seqs, a.layers, a.experts, a.topk, a.domains)
    verl_rank = np.arange(a.seqs) % a.ep
    minibatch = np.arange(a.seqs) * a.mini_batches // a.seqs
    node_of_rank = np.arange(a.ep) // a.gpus_per_node
    count_s = time_counting(lens, a.layers, a.experts, a.topk)
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        p = plan_locality(usage, lens, node_of_rank, verl_rank, minibatch=minibatch)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"shape": {"seqs": a.seqs, "layers": a.layers, "experts": a.experts, "topk": a.topk, "ep": a.ep,
                                "nodes": int(node_of_rank.max()) + 1, "domains": a.domains, "mini_batches": a.mini_batches},
                      "count_routes_s": count_s, "plan_s": {"min": min(times), "median": float(np.median(times))},
                      "inter_node_fraction": p.inter_node_fraction, "verl": p.verl_fraction,
                      "verl_best_experts": p.verl_best_fraction, "fell_back": p.fell_back, "reason": p.reason,
                      "rounds": p.rounds}, indent=1))


if __name__ == "__main__":
    main()
