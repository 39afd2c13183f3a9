"""`relibra-verl synth` writes synthetic RL-like routing traces; `relibra-verl synth-stats` prints the
generator's statistics beside its calibration targets (facts.md) and the bundled real traces.

  relibra-verl synth --model qwen3-30b-a3b --seqs 256 --steps 2 --out qwen.npz
  relibra-verl synth-stats [--model deepseek-v2-lite] [--json PATH]

A multi-step trace holds the steps' sequences in order; meta `step_seq_offsets` [steps+1] gives the first
sequence of each step (so `simulate --trace FILE --steps S` cuts it back into the same batches when unshuffled).
"""
from __future__ import annotations

import json
import sys

import numpy as np

from relibra_verl.errors import UsageError
from relibra_verl.routing.trace import BUNDLED, Trace, load_trace, save_trace
from relibra_verl.sim.presets import PRESETS, get_preset
from relibra_verl.sim.synth import RoutingGenerator, params_for, routing_stats

STAT_KEYS = ("maxmean_median", "maxmean_p90", "maxmean_max", "top10_share", "consecutive_shared", "dispersion")


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic RL-like routing trace (npz) for a model preset",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="PRESET", help="one of " + ", ".join(PRESETS))
    p.add_argument("--seqs", type=int, required=True, metavar="N", help="sequences per step")
    p.add_argument("--steps", type=int, default=1, metavar="S", help="RL steps (popularity drifts between them)")
    p.add_argument("--out", required=True, metavar="PATH", help="output npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean-len", type=float, default=None, metavar="T", help="mean tokens per sequence (default 1500)")
    p.add_argument("--max-len", type=int, default=None, metavar="T", help="longest sequence (default 8192)")
    p.add_argument("--domains", type=int, default=None, metavar="D", help="task domains mixed in a batch (default 4)")
    p.set_defaults(func=run_synth)

    q = subparsers.add_parser("synth-stats", help="synthetic routing statistics vs calibration targets and real traces",
                              description="Generator statistics beside facts.md's figures and the bundled real traces.")
    q.add_argument("--model", default=None, metavar="PRESET", help="one preset (default: all)")
    q.add_argument("--tokens", type=int, default=16384, metavar="T", help="tokens per single-domain sample (default 16384)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", default=None, metavar="PATH")
    q.set_defaults(func=run_stats)


def _overrides(args) -> dict:
    out = {}
    if args.mean_len is not None:
        if args.mean_len < 16:
            raise UsageError(f"--mean-len must be >= 16, got {args.mean_len}")
        out["mean_len"] = args.mean_len
    if args.max_len is not None:
        if args.max_len < 16:
            raise UsageError(f"--max-len must be >= 16, got {args.max_len}")
        out["max_len"] = args.max_len
    if args.domains is not None:
        if args.domains < 1:
            raise UsageError(f"--domains must be >= 1, got {args.domains}")
        out["num_domains"] = args.domains
    return out


def run_synth(args) -> int:
    model = get_preset(args.model)
    if args.seqs < 1 or args.steps < 1:
        raise UsageError(f"--seqs and --steps must be >= 1, got {args.seqs} and {args.steps}")
    gen = RoutingGenerator(model, seed=args.seed, params=params_for(model, **_overrides(args)))
    steps = [gen.batch(args.seqs) for _ in range(args.steps)]
    ids = np.concatenate([t.expert_ids for t in steps])
    lens = np.concatenate([t.seq_lens() for t in steps])
    meta = dict(steps[0].meta)
    meta.pop("step", None)
    meta["steps"] = args.steps
    meta["seed"] = args.seed
    meta["step_seq_offsets"] = [i * args.seqs for i in range(args.steps + 1)]
    meta["domains_per_step"] = [t.meta["domains"] for t in steps]
    meta.pop("domains", None)
    trace = Trace(ids, np.concatenate([[0], np.cumsum(lens)]).astype(np.int64), model.num_experts, meta)
    try:
        save_trace(args.out, trace)
    except OSError as exc:
        raise UsageError(f"{args.out}: cannot write ({exc.strerror or exc})") from None
    print(f"wrote {args.out}: {model.name}, {args.steps} step(s) x {args.seqs} sequences, {trace.num_tokens} tokens, "
          f"[T, L, K] = {list(trace.expert_ids.shape)}")
    return 0


def stats_rows(model_name: str, tokens: int, seed: int) -> list[tuple[str, dict]]:
    """(label, stats) rows for one preset: facts.md target, generator single-domain at short and long sequences,
    a mixed-domain RL batch, and for deepseek-v2-lite the real bundled traces beside generator samples with the
    same sequence lengths."""
    m = get_preset(model_name)
    sk = m.skew
    rows = [(f"target ({sk.source})", {"maxmean_median": sk.maxmean_median, "maxmean_max": sk.maxmean_max,
                                       "top10_share": sk.top10_share, "consecutive_shared": sk.consecutive_shared})]
    for i, mean_len in enumerate((64, 1500)):
        gen = RoutingGenerator(m, seed=seed + i, params=params_for(m, mean_len=mean_len))
        rows.append((f"generator, 1 domain, ~{mean_len}-token seqs", routing_stats(gen.batch(max(2, tokens // mean_len), domain=0))))
    gen = RoutingGenerator(m, seed=seed + 7)
    rows.append(("generator, RL batch (4 domains mixed)", routing_stats(gen.batch(max(2, tokens // 1500)))))
    if m.name == "deepseek-v2-lite":
        for j, name in enumerate(BUNDLED):
            real = load_trace(f"bundled:{name}")
            rows.append((f"real bundled:{name}", routing_stats(real)))
            gen = RoutingGenerator(m, seed=seed + 11 + j)
            rows.append((f"generator, same lengths as {name}", routing_stats(gen.batch(real.num_seqs, seq_lens=real.seq_lens(), domain=0))))
    return rows


def run_stats(args) -> int:
    names = [get_preset(args.model).name] if args.model else list(PRESETS)
    if args.tokens < 256:
        raise UsageError(f"--tokens must be >= 256, got {args.tokens}")
    out = {}
    cols = ("max/mean p50", "p90", "max", "top10%", "consec", "disp")
    for name in names:
        rows = stats_rows(name, args.tokens, args.seed)
        out[name] = {label: s for label, s in rows}
        print(f"{name}: per-layer max/mean of expert counts, hottest-10% share, experts shared by consecutive "
              f"tokens, micro-batch (2048-token) dispersion (chi^2/df; 1 = multinomial)")
        print(f"  {'source':<58}" + "".join(f"{c:>13}" for c in cols))
        for label, s in rows:
            print(f"  {label:<58}" + "".join(f"{s[k]:>13.2f}" if k in s else f"{'-':>13}" for k in STAT_KEYS))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
