"""Synthetic RL-like routing, calibrated to the skew of real MoE routing, and the statistics that judge it.

Model (per MoE layer l; E experts, K top-k; all draws from one seeded numpy Generator):
  1. Domain popularity: log p[d, l, :] = sigma_l * (sqrt(c) * z_shared[l] + sqrt(1-c) * z[d, l]), z ~ N(0, 1),
     sigma_l = sigma * exp(spread * u_l), u_l ~ N(0, 1) (layers differ in skew). Each domain (math, code,
     chat, ...) has its own hot experts: facts.md says top-8 sets of different tasks overlap only 7-14%.
  2. A batch mixes domains: weights ~ Dirichlet(mix_alpha); each sequence draws one domain; sequence lengths
     are log-normal (RL responses are long and spread).
  3. Per-sequence over-dispersion: p_seq = Dirichlet(concentration * p[domain]) (facts.md: per-micro-batch
     counts are over-dispersed 2-5x for long documents: a per-sequence Dirichlet around the task popularity).
  4. Tokens: each top-k slot either repeats the previous token's expert in that slot (probability `reuse`;
     facts.md: consecutive tokens share ~3.3 of 8 (Qwen3) / ~1.6 of 6 (V2-Lite)) or draws from p_seq; the K
     ids of a token are made distinct by redrawing duplicates (top-k never repeats an expert).
  5. Drift between steps: z <- sqrt(1 - drift^2) z + drift * N(0, 1) (small: hot experts move much more
     between micro-batches than between steps, facts.md / ForeMoE).
Calibration parameters per preset are in CALIBRATION with how they were fitted; tests/sim/test_synth.py checks
the generator against facts.md within the tolerances stated there.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from relibra_verl.errors import UsageError
from relibra_verl.routing.trace import Trace
from relibra_verl.sim.presets import ModelPreset, get_preset


@dataclasses.dataclass(frozen=True)
class SynthParams:
    """Generator knobs (see the module docstring)."""

    sigma: float                # median log-popularity spread of one domain (skew)
    spread: float = 0.15        # per-layer variation of sigma
    shared: float = 0.1         # c: correlation of hot experts across domains
    concentration: float = 8000.0  # per-sequence Dirichlet concentration (smaller = more over-dispersed)
    reuse: float = 0.35         # probability a top-k slot repeats the previous token's expert
    num_domains: int = 4
    mix_alpha: float = 2.0      # Dirichlet over domain weights in a batch
    mean_len: float = 1500.0    # mean tokens per sequence (log-normal)
    len_sigma: float = 0.8
    max_len: int = 8192
    drift: float = 0.1          # per-step drift of the popularity logits


# Fitted by hand sweeps against facts.md on single-domain batches of ~16k tokens (the scale of the sources'
# measurements; `relibra-verl synth-stats` prints the result): sigma sets the median per-layer max/mean,
# spread the tail, reuse the consecutive-token overlap, concentration (8000, shared) the per-micro-batch
# dispersion (~1.2-1.9 for 64-token sequences, 2.5-5 for 1500-token ones; facts.md: multinomial-like for
# short sequences, 2-5x for long documents).
CALIBRATION: dict[str, SynthParams] = {
    "qwen3-30b-a3b": SynthParams(sigma=1.45, spread=0.15, reuse=0.32),
    "qwen3-235b-a22b": SynthParams(sigma=1.45, spread=0.15, reuse=0.32),
    "deepseek-v3": SynthParams(sigma=0.78, spread=0.15, reuse=0.22),
    "deepseek-v2-lite": SynthParams(sigma=0.85, spread=0.2, reuse=0.12),
}


def params_for(model: ModelPreset, **overrides) -> SynthParams:
    return dataclasses.replace(CALIBRATION[model.name], **overrides)


class RoutingGenerator:
    """Draws batches (one per RL step) of synthetic routing for a preset.

    gen = RoutingGenerator(get_preset("qwen3-30b-a3b"), seed=0); trace = gen.batch(num_seqs=256)
    Each call to batch() is one step: the popularity drifts before the next one.
    """

    def __init__(self, model: ModelPreset, seed: int = 0, params: SynthParams | None = None, domains: int | None = None):
        self.model = model
        self.params = params or CALIBRATION[model.name]
        if domains is not None:
            self.params = dataclasses.replace(self.params, num_domains=domains)
        if self.params.num_domains < 1:
            raise UsageError(f"the generator needs at least one domain, got {self.params.num_domains}")
        self.rng = np.random.default_rng(seed)
        L, E, D = model.num_moe_layers, model.num_experts, self.params.num_domains
        self.sigma_l = self.params.sigma * np.exp(self.params.spread * self.rng.standard_normal(L))  # [L]
        self.z_shared = self.rng.standard_normal((L, E))
        self.z_dom = self.rng.standard_normal((D, L, E))
        self.step = 0

    def popularity(self) -> np.ndarray:
        """[D, L, E] routing probability of each expert per domain and layer (rows sum to 1)."""
        c = self.params.shared
        logit = self.sigma_l[None, :, None] * (math.sqrt(c) * self.z_shared[None] + math.sqrt(1 - c) * self.z_dom)
        p = np.exp(logit - logit.max(axis=2, keepdims=True))
        return p / p.sum(axis=2, keepdims=True)

    def drift(self) -> None:
        """Move the popularity one step (between RL steps)."""
        d = self.params.drift
        keep = math.sqrt(1 - d * d)
        self.z_shared = keep * self.z_shared + d * self.rng.standard_normal(self.z_shared.shape)
        self.z_dom = keep * self.z_dom + d * self.rng.standard_normal(self.z_dom.shape)

    def seq_lengths(self, num_seqs: int) -> np.ndarray:
        """[S] log-normal lengths with the configured mean, clipped to [16, max_len]."""
        p = self.params
        mu = math.log(p.mean_len) - p.len_sigma ** 2 / 2
        return np.clip(np.round(self.rng.lognormal(mu, p.len_sigma, num_seqs)), 16, p.max_len).astype(np.int64)

    def batch(self, num_seqs: int, seq_lens: np.ndarray | None = None, domain: int | None = None) -> Trace:
        """One step's batch: [T, L, K] routes of num_seqs sequences. domain: force every sequence into one
        domain (calibration against single-task measurements); default: a Dirichlet mix of domains."""
        m, p, rng = self.model, self.params, self.rng
        if num_seqs < 1:
            raise UsageError(f"--seqs must be >= 1, got {num_seqs}")
        lens = self.seq_lengths(num_seqs) if seq_lens is None else np.asarray(seq_lens, dtype=np.int64)
        S, T = len(lens), int(lens.sum())
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        if domain is None:
            weights = rng.dirichlet(np.full(p.num_domains, p.mix_alpha))
            dom = rng.choice(p.num_domains, size=S, p=weights)
        else:
            dom = np.full(S, domain % p.num_domains)
        pop = self.popularity()
        seq_of = np.repeat(np.arange(S), lens)
        starts = np.zeros(T, dtype=bool)
        starts[offsets[:-1]] = True
        ids = np.empty((T, m.num_moe_layers, m.topk), dtype=np.int16)
        for l in range(m.num_moe_layers):
            ids[:, l] = self._layer(pop[dom, l], seq_of, starts)
        self.step += 1
        self.drift()
        meta = {"model": m.name, "num_experts": m.num_experts, "topk": m.topk, "num_moe_layers": m.num_moe_layers,
                "source": "relibra_verl.sim.synth (synthetic, calibrated to facts.md)", "step": self.step - 1,
                "params": dataclasses.asdict(p), "domains": np.bincount(dom, minlength=p.num_domains).tolist()}
        return Trace(ids, offsets, m.num_experts, meta, name=f"synthetic:{m.name}:step{self.step - 1}")

    def _layer(self, p_dom: np.ndarray, seq_of: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """p_dom [S, E] domain popularity of each sequence -> [T, K] distinct ids."""
        rng, K = self.rng, self.model.topk
        S, E = p_dom.shape
        T = len(seq_of)
        # per-sequence Dirichlet around the domain popularity, with a floor so K distinct ids always exist
        g = rng.standard_gamma(np.maximum(self.params.concentration * p_dom, 1e-3))
        p_seq = g / g.sum(axis=1, keepdims=True)
        p_seq = 0.999 * p_seq + 0.001 / E
        cdf = np.cumsum(p_seq, axis=1)
        cdf /= cdf[:, -1:]
        flat = (cdf + np.arange(S)[:, None]).ravel()

        def draw(rows):
            u = rng.random(len(rows)) + seq_of[rows]
            return np.minimum(np.searchsorted(flat, u, side="right") - seq_of[rows] * E, E - 1)

        fresh = draw(np.repeat(np.arange(T), K)).reshape(T, K)
        reuse = rng.random((T, K)) < self.params.reuse
        reuse[starts] = False
        src = np.where(reuse, 0, np.arange(T)[:, None])
        src = np.maximum.accumulate(src, axis=0)  # [T, K] token whose fresh draw each slot carries
        cols = np.arange(K)[None, :]
        rows = np.arange(T)  # rows to check: all at first, then those that carry a redrawn slot
        for _ in range(64):
            ids_r = fresh[src[rows], cols]
            srt = np.sort(ids_r, axis=1)
            has = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
            if not has.any():
                break
            rr, ids_d, reuse_d = rows[has], ids_r[has], reuse[rows[has]]
            bad = np.zeros(ids_d.shape, dtype=bool)
            for j in range(K):
                for k in range(j + 1, K):
                    dup = ids_d[:, j] == ids_d[:, k]
                    # redraw the slot drawn at this token (two reused slots never collide: the token they
                    # come from was distinct); if both were drawn here, the later one
                    take_k = dup & ~reuse_d[:, k]
                    bad[:, k] |= take_k
                    bad[:, j] |= dup & ~take_k & ~reuse_d[:, j]
            t_i, k_i = np.nonzero(bad)
            t = rr[t_i]
            fresh[t, k_i] = draw(t)
            changed = np.zeros((T, K), dtype=bool)
            changed[t, k_i] = True
            rows = np.flatnonzero(changed[src, np.arange(K)[None, :]].any(axis=1))
        else:
            return self._fallback(fresh[src, cols], E)
        return fresh[src, cols]

    def _fallback(self, ids: np.ndarray, E: int) -> np.ndarray:
        """Rare: uniform redraws until every row is distinct (p_seq concentrated on fewer than K experts)."""
        rng = self.rng
        srt = np.sort(ids, axis=1)
        for t in np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1)):
            seen, out = set(), []
            for e in ids[t].tolist():
                while e in seen:
                    e = int(rng.integers(E))
                seen.add(e)
                out.append(e)
            ids[t] = out
        return ids


def generate_steps(model: ModelPreset | str, num_seqs: int, steps: int, seed: int = 0, **overrides) -> list[Trace]:
    """`steps` batches of `num_seqs` sequences, drifting between steps."""
    model = get_preset(model) if isinstance(model, str) else model
    gen = RoutingGenerator(model, seed=seed, params=params_for(model, **overrides))
    return [gen.batch(num_seqs) for _ in range(steps)]


# ---------------------------------------------------------------- statistics


def layer_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, L, K] ids (-1 ignored) -> [L, E] pair counts."""
    ids = np.asarray(expert_ids, dtype=np.int64)
    T, L, K = ids.shape
    valid = ids >= 0
    flat = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)[valid] * num_experts + ids[valid]
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def _chunks(seq_offsets: np.ndarray, tokens: int) -> np.ndarray:
    """Contiguous micro-batches of whole sequences with about `tokens` tokens: [C+1] token offsets."""
    bounds, start = [0], 0
    for end in seq_offsets[1:]:
        if end - start >= tokens:
            bounds.append(int(end))
            start = int(end)
    if bounds[-1] != seq_offsets[-1]:
        if len(bounds) > 1 and seq_offsets[-1] - bounds[-1] < tokens // 2:
            bounds[-1] = int(seq_offsets[-1])  # fold a small tail into the last chunk
        else:
            bounds.append(int(seq_offsets[-1]))
    return np.asarray(bounds)


def routing_stats(trace: Trace, micro_batch_tokens: int = 2048) -> dict:
    """Statistics of a trace (the figures facts.md reports).

    maxmean_{median,p90,max}: per-layer hottest expert's count over the mean.
    top10_share: median over layers of the share of pairs taken by the hottest 10% of experts.
    consecutive_shared: mean number of experts shared by consecutive tokens of one sequence (of K).
    dispersion: median over layers of Pearson's chi^2 / df between micro-batches of ~micro_batch_tokens
        whole sequences (1 = multinomial draws; facts.md: 2-5 for long documents).
    """
    ids = np.asarray(trace.expert_ids)
    E = trace.num_experts
    T, L, K = ids.shape
    counts = layer_counts(ids, E).astype(np.float64)  # [L, E]
    maxmean = counts.max(axis=1) / counts.mean(axis=1)
    top = max(1, int(round(0.1 * E)))
    top10 = np.sort(counts, axis=1)[:, ::-1][:, :top].sum(axis=1) / counts.sum(axis=1)
    # consecutive tokens inside a sequence
    same_seq = np.ones(T - 1, dtype=bool) if T > 1 else np.zeros(0, dtype=bool)
    inner = trace.seq_offsets[1:-1]
    same_seq[inner - 1] = False
    a, b = ids[:-1][same_seq], ids[1:][same_seq]  # [P, L, K]
    shared = (a[:, :, :, None] == b[:, :, None, :]) & (a[:, :, :, None] >= 0)
    consecutive = float(shared.sum(axis=(2, 3)).mean()) if len(a) else float("nan")
    # per-micro-batch dispersion
    bounds = _chunks(np.asarray(trace.seq_offsets), micro_batch_tokens)
    C = len(bounds) - 1
    if C >= 2:
        mb = np.stack([layer_counts(ids[bounds[c]:bounds[c + 1]], E) for c in range(C)]).astype(np.float64)  # [C, L, E]
        n = mb.sum(axis=2, keepdims=True)  # [C, L, 1]
        p = mb.sum(axis=0, keepdims=True) / n.sum(axis=0, keepdims=True)  # [1, L, E]
        expect = n * p
        with np.errstate(divide="ignore", invalid="ignore"):
            chi = np.where(expect > 0, (mb - expect) ** 2 / expect, 0.0).sum(axis=(0, 2))
        df = (C - 1) * ((p[0] > 0).sum(axis=1) - 1)
        dispersion = float(np.median(chi / np.maximum(df, 1)))
    else:
        dispersion = float("nan")
    return {
        "tokens": int(T), "seqs": int(trace.num_seqs), "layers": int(L),
        "maxmean_median": float(np.median(maxmean)), "maxmean_p90": float(np.percentile(maxmean, 90)),
        "maxmean_max": float(maxmean.max()), "top10_share": float(np.median(top10)),
        "consecutive_shared": consecutive, "dispersion": dispersion,
    }
