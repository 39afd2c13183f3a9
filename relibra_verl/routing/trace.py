"""Routing traces on disk: the npz format, loading, validation.

Format (one file, numpy npz):
  expert_ids    int [T, L, K]   expert chosen by token t at MoE layer l (-1: route unknown / masked)
  seq_offsets   int [S+1]       token t belongs to sequence s when seq_offsets[s] <= t < seq_offsets[s+1]
  gate_weights  float [T, L, K] optional router weights
  meta          str (JSON)      at least `num_experts`; `topk`, `model`, `source` recommended

`bundled:NAME` names a trace shipped in relibra_verl/data (esft_intent, esft_law).
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from importlib import resources

import numpy as np

from relibra_verl.errors import TraceError

BUNDLED = ("esft_intent", "esft_law")


@dataclasses.dataclass
class Trace:
    """One routing trace.

    expert_ids:  [T, L, K] int64, -1 for unknown routes.
    seq_offsets: [S+1] int64, starting at 0 and ending at T.
    """

    expert_ids: np.ndarray
    seq_offsets: np.ndarray
    num_experts: int
    meta: dict
    name: str = "trace"
    gate_weights: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def topk(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_offsets) - 1

    def seq_lens(self) -> np.ndarray:
        """[S] tokens per sequence."""
        return np.diff(self.seq_offsets)

    def sequence(self, s: int) -> np.ndarray:
        """[len_s, L, K] routes of sequence s."""
        return self.expert_ids[self.seq_offsets[s]:self.seq_offsets[s + 1]]


def resolve_path(spec: str) -> tuple[str, str]:
    """`bundled:NAME` or a path -> (display name, filesystem path)."""
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        if name not in BUNDLED:
            raise TraceError(f"{spec}: unknown bundled trace; choose one of {', '.join('bundled:' + b for b in BUNDLED)}")
        return spec, str(resources.files("relibra_verl.data").joinpath(f"{name}.npz"))
    return spec, spec


def load_trace(spec: str) -> Trace:
    """Load and validate a trace file (`bundled:NAME` or a path). Raises TraceError naming file and array."""
    name, path = resolve_path(spec)
    if not os.path.isfile(path):
        raise TraceError(f"{name}: no such trace file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise TraceError(f"{name}: not a readable npz trace ({exc.__class__.__name__}: {exc})") from None
    return trace_from_arrays(arrays, name=name)


def trace_from_arrays(arrays: dict, name: str = "trace") -> Trace:
    """Validate raw arrays (as stored in the npz) and build a Trace."""
    for key in ("expert_ids", "seq_offsets"):
        if key not in arrays:
            raise TraceError(f"{name}: array `{key}` is missing")
    meta = _parse_meta(arrays.get("meta"), name)
    ids = np.asarray(arrays["expert_ids"])
    if ids.ndim != 3:
        raise TraceError(f"{name}: array `expert_ids` must be 3-D [tokens, layers, topk], got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TraceError(f"{name}: array `expert_ids` must hold integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    num_experts = meta.get("num_experts")
    if num_experts is None:
        num_experts = int(ids.max()) + 1 if ids.size else 1
    num_experts = int(num_experts)
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= num_experts:
            bad = np.argwhere((ids < -1) | (ids >= num_experts))[0]
            raise TraceError(
                f"{name}: array `expert_ids` has id {int(ids[tuple(bad)])} at [token {bad[0]}, layer {bad[1]}, k {bad[2]}]"
                f" outside [-1, {num_experts}) (num_experts={num_experts})")
        dup = _duplicate_ids(ids)
        if dup is not None:
            raise TraceError(f"{name}: array `expert_ids` repeats expert {dup[2]} within the top-k of token {dup[0]}, layer {dup[1]}")
    offsets = np.asarray(arrays["seq_offsets"])
    if offsets.ndim != 1 or len(offsets) < 2 or not np.issubdtype(offsets.dtype, np.integer):
        raise TraceError(f"{name}: array `seq_offsets` must be a 1-D integer array [num_seqs + 1], got shape {offsets.shape} dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != ids.shape[0]:
        raise TraceError(f"{name}: array `seq_offsets` must run from 0 to the token count {ids.shape[0]}, got {offsets[0]}..{offsets[-1]}")
    if (np.diff(offsets) <= 0).any():
        s = int(np.flatnonzero(np.diff(offsets) <= 0)[0])
        raise TraceError(f"{name}: array `seq_offsets` is not strictly increasing at sequence {s} (empty or negative length)")
    gate = arrays.get("gate_weights")
    if gate is not None and np.shape(gate) != ids.shape:
        raise TraceError(f"{name}: array `gate_weights` has shape {np.shape(gate)}, expected {ids.shape}")
    return Trace(ids, offsets, num_experts, meta, name=name, gate_weights=gate)


def _parse_meta(raw, name: str) -> dict:
    if raw is None:
        return {}
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{name}: array `meta` is not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise TraceError(f"{name}: array `meta` must be a JSON object")
    return meta


def _duplicate_ids(ids: np.ndarray):
    """First (token, layer, expert) whose expert appears twice in one top-k, ignoring -1; else None."""
    s = np.sort(ids, axis=2)
    dup = (s[:, :, 1:] == s[:, :, :-1]) & (s[:, :, 1:] >= 0)
    if not dup.any():
        return None
    t, l, k = np.argwhere(dup)[0]
    return int(t), int(l), int(s[t, l, k])


def save_trace(path: str, trace: Trace) -> None:
    """Write a trace in the npz format (expert_ids stored as int16 when ids fit)."""
    ids = trace.expert_ids
    dtype = np.int16 if trace.num_experts < 2 ** 15 else np.int32
    meta = dict(trace.meta)
    meta.setdefault("num_experts", trace.num_experts)
    arrays = {"expert_ids": ids.astype(dtype), "seq_offsets": trace.seq_offsets.astype(np.int64), "meta": np.array(json.dumps(meta))}
    if trace.gate_weights is not None:
        arrays["gate_weights"] = trace.gate_weights
    np.savez_compressed(path, **arrays)


def concat_traces(traces: list[Trace]) -> Trace:
    """Join traces (same L, K, E) into one: sequences keep their routes, offsets are shifted."""
    first = traces[0]
    for t in traces[1:]:
        if (t.num_layers, t.topk, t.num_experts) != (first.num_layers, first.topk, first.num_experts):
            raise TraceError(
                f"{t.name}: shape (layers={t.num_layers}, topk={t.topk}, experts={t.num_experts}) differs from "
                f"{first.name} (layers={first.num_layers}, topk={first.topk}, experts={first.num_experts})")
    if len(traces) == 1:
        return first
    ids = np.concatenate([t.expert_ids for t in traces])
    lens = np.concatenate([t.seq_lens() for t in traces])
    offsets = np.concatenate([[0], np.cumsum(lens)])
    return Trace(ids, offsets, first.num_experts, dict(first.meta), name="+".join(t.name for t in traces))
