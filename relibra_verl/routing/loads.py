"""Routing -> loads: form a batch of sequences, split it over EP ranks and micro-batches, count.

The split follows verl 0.9.1's dynamic batching: sequences are first balanced over data-parallel (= EP)
ranks by token count (`trainer.balance_batch`, equal sequence counts), then each rank cuts its sequences
into micro-batches balanced by verl's attention workload `24576 * len + len**2`
(`rearrange_micro_batches`), starting from `ceil(tokens / budget)` micro-batches and adding one until every
micro-batch fits the budget; the count is forced equal across ranks (unequal counts deadlock the MoE
all-to-all). A sequence longer than the budget is an error, as in verl. Sequences are never cut.
verl partitions with Karmarkar-Karp, this module greedily (longest first): the partitions can differ,
the rules are the same.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from relibra_verl.errors import UsageError
from relibra_verl.routing.trace import Trace, concat_traces


@dataclasses.dataclass
class MicroBatchSplit:
    """seqs[m][r]: indices (into the batch's sequences) that rank r processes in micro-batch m."""

    seqs: list[list[np.ndarray]]

    @property
    def num_micro_batches(self) -> int:
        return len(self.seqs)

    @property
    def num_ranks(self) -> int:
        return len(self.seqs[0]) if self.seqs else 0


def form_batch(traces: list[Trace], seed: int = 0, resample: int | None = None,
               max_seq_len: int | None = None) -> Trace:
    """All sequences of `traces` as one batch, shuffled with `seed`; or `resample` sequences drawn with
    replacement (seeded) from those no longer than `max_seq_len` (a user's token budget is set above
    their longest sequence, so longer recorded ones are not drawn)."""
    joined = concat_traces(traces)
    rng = np.random.default_rng(seed)
    if resample is not None:
        if resample < 1:
            raise UsageError(f"--resample must be >= 1, got {resample}")
        pool = np.arange(joined.num_seqs)
        if max_seq_len is not None:
            pool = pool[joined.seq_lens() <= max_seq_len]
            if not len(pool):
                raise UsageError(f"no sequence of {joined.name} fits the token budget {max_seq_len}")
        order = pool[rng.integers(0, len(pool), size=resample)]
    else:
        order = rng.permutation(joined.num_seqs)
    return select_sequences(joined, order)


def select_sequences(trace: Trace, order: np.ndarray) -> Trace:
    """A trace made of `trace`'s sequences in `order` (repeats allowed)."""
    lens = trace.seq_lens()[order]
    starts = trace.seq_offsets[:-1][order]
    token_index = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)]) if len(order) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return Trace(trace.expert_ids[token_index], offsets, trace.num_experts, dict(trace.meta), name=trace.name)


def _balanced_partition(lengths: np.ndarray, parts: int, equal_count: bool) -> list[np.ndarray]:
    """Longest-first greedy: each item to the lightest part (ties: lowest index). Returns item indices
    per part, in ascending order. With equal_count, a part takes at most ceil(n / parts) items."""
    cap = -(-len(lengths) // parts) if equal_count else len(lengths)
    loads = np.zeros(parts, dtype=np.int64)
    sizes = np.zeros(parts, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(parts)]
    for i in np.argsort(-lengths, kind="stable"):
        open_parts = np.flatnonzero(sizes < cap)
        p = open_parts[np.argmin(loads[open_parts])]
        members[p].append(int(i))
        loads[p] += lengths[i]
        sizes[p] += 1
    return [np.array(sorted(m), dtype=np.int64) for m in members]


def split_micro_batches(seq_lens: np.ndarray, ep_size: int, tokens_per_rank: int,
                        rank_of_seq: np.ndarray | None = None) -> MicroBatchSplit:
    """Split sequences over `ep_size` ranks, then into micro-batches of about `tokens_per_rank` tokens.

    seq_lens: [S] tokens per sequence.  rank_of_seq: [S] each sequence's rank when already placed
    (relibra_verl.planner.locality), else balanced here.  Returns a MicroBatchSplit with M = max over ranks
    of ceil(rank tokens / tokens_per_rank) micro-batches (at least 1).
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    if tokens_per_rank < 1:
        raise UsageError(f"--tokens-per-rank must be >= 1, got {tokens_per_rank}")
    if len(seq_lens) and seq_lens.max() > tokens_per_rank:
        s = int(np.argmax(seq_lens))
        raise UsageError(
            f"sequence {s} has {int(seq_lens[s])} tokens, more than --tokens-per-rank {tokens_per_rank} "
            "(verl's dynamic batching refuses a sequence longer than the token budget)")
    if rank_of_seq is None:
        per_rank = _balanced_partition(seq_lens, ep_size, equal_count=True)
    else:
        per_rank = [np.flatnonzero(np.asarray(rank_of_seq) == r) for r in range(ep_size)]
    num_mb = max(1, max(-(-int(seq_lens[idx].sum()) // tokens_per_rank) for idx in per_rank))
    while True:
        parts = [_balanced_partition(verl_workload(seq_lens[idx]), num_mb, equal_count=False) for idx in per_rank]
        if all(seq_lens[idx][p].sum() <= tokens_per_rank for idx, rank_parts in zip(per_rank, parts) for p in rank_parts):
            break
        num_mb += 1
    seqs = [[idx[rank_parts[m]] for idx, rank_parts in zip(per_rank, parts)] for m in range(num_mb)]
    return MicroBatchSplit(seqs)


def verl_workload(seq_lens: np.ndarray) -> np.ndarray:
    """verl 0.9.1's relative attention workload of a sequence (seqlen_balancing.calculate_workload)."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    return 24576 * seq_lens + seq_lens ** 2


def count_loads(trace: Trace, split: MicroBatchSplit) -> np.ndarray:
    """counts[m, l, r, e]: routed (token, k) pairs of micro-batch m, layer l, source rank r, expert e.

    Unknown routes (-1) are not counted. Returns int64 [M, L, G, E].
    """
    M, G = split.num_micro_batches, split.num_ranks
    T, L, K = trace.expert_ids.shape
    E = trace.num_experts
    group = np.full(T, -1, dtype=np.int64)  # (m * G + r) of every token
    lens = trace.seq_lens()
    for m in range(M):
        for r in range(G):
            for s in split.seqs[m][r]:
                group[trace.seq_offsets[s]:trace.seq_offsets[s] + lens[s]] = m * G + r
    ids = trace.expert_ids
    valid = (ids >= 0) & (group[:, None, None] >= 0)
    g_idx = np.broadcast_to(group[:, None, None], ids.shape)[valid]
    l_idx = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)[valid]
    flat = (g_idx * L + l_idx) * E + ids[valid]
    counts = np.bincount(flat, minlength=M * G * L * E).reshape(M, G, L, E)
    return counts.transpose(0, 2, 1, 3).copy()


def counts_from_routes(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, L, K] ids (-1 unknown) of one rank's micro-batch -> [L, E] pair counts."""
    ids = np.asarray(expert_ids, dtype=np.int64)
    T, L, K = ids.shape
    valid = ids >= 0
    flat = (np.broadcast_to(np.arange(L)[None, :, None], ids.shape)[valid] * num_experts) + ids[valid]
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)
