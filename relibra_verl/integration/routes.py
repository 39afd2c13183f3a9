"""Capture and normalise `routed_experts` as vLLM and verl deliver them.

Layouts (T_s: tokens of sample s = prompt + response, L_all: the model's decoder layers, K: top-k):

  vLLM (>= 0.22) `RequestOutput.outputs[0].routed_experts`   np.ndarray [T_s - 1, L_all, K]
      (the last sampled token was never fed to the model, so it has no route; dense layers hold zeros)
  verl V1 (TransferQueue, default trainer)                   jagged tensor, sample s: [T_s or T_s - 1, L_all, K]
  verl legacy DataProto                                       [bsz, P + R, L_all, K], prompt left-padded,
                                                              response right-padded (`attention_mask` marks tokens)

Normalised form, per sample: int32 [T_s, L, K] over the MoE layers only (L of them, in model order, from the
model's layer map), -1 where the route is unknown (rows past the recorded ones, negative ids). Any integer
dtype is accepted (int16 in verl 0.9.1; int64 and uint8 elsewhere). A sample whose route rows are neither
T_s nor T_s - 1, or an id >= E, raises RoutesError naming the sample and the layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from relibra_verl.errors import UsageError


class RoutesError(UsageError, ValueError):
    """Malformed routing data; the message names the sample (and the layer where it applies)."""


def moe_layer_indices(num_layers: int, moe_layer_freq: Any = 1) -> np.ndarray:
    """[L] decoder-layer index (0-based) of every MoE layer, as Megatron / verl's `is_moe_layer` decide.

    moe_layer_freq: int f (layer i is MoE when i % f == 0) or a list of 0/1 of length num_layers.
    """
    if isinstance(moe_layer_freq, bool) or moe_layer_freq is None:
        moe_layer_freq = 1
    if isinstance(moe_layer_freq, int):
        return np.arange(0, num_layers, moe_layer_freq, dtype=np.int64)
    pattern = list(moe_layer_freq)
    if len(pattern) != num_layers:
        raise RoutesError(f"moe_layer_freq has {len(pattern)} entries for {num_layers} layers")
    return np.flatnonzero(np.asarray(pattern) == 1).astype(np.int64)


def moe_layers_of(tf_config) -> np.ndarray:
    """The layer map of a Megatron TransformerConfig (num_layers, moe_layer_freq)."""
    return moe_layer_indices(int(tf_config.num_layers), getattr(tf_config, "moe_layer_freq", 1))


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (CPU or device)
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def normalize_sample(routes, *, num_tokens: int, num_experts: int, moe_layers: np.ndarray,
                     num_layers: int | None = None, sample: int | str = 0) -> np.ndarray:
    """One sample's routes -> int32 [num_tokens, L, K] over MoE layers, -1 unknown.

    routes: [rows, L_all, K] or [rows, L, K] (already MoE-only) of any integer dtype, rows in
      {num_tokens, num_tokens - 1}; num_layers: the model's decoder layers (L_all), if known.
    """
    arr = _as_numpy(routes)
    if arr.ndim != 3:
        raise RoutesError(f"sample {sample}: routed_experts must be [tokens, layers, topk], got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer)):
        raise RoutesError(f"sample {sample}: routed_experts must hold integers, got dtype {arr.dtype}")
    rows, layers, k = arr.shape
    moe_layers = np.asarray(moe_layers, dtype=np.int64)
    if rows not in (num_tokens, num_tokens - 1):
        raise RoutesError(
            f"sample {sample}: routed_experts has {rows} rows for {num_tokens} tokens "
            f"(expected {num_tokens} or {num_tokens - 1}: the last sampled token has no route)")
    if num_layers is not None and layers == num_layers:
        layer_ids = moe_layers
    elif layers == len(moe_layers):
        layer_ids = np.arange(layers)  # already MoE-only (e.g. R2-recorded routes)
    elif num_layers is None and layers > int(moe_layers.max(initial=-1)):
        layer_ids = moe_layers
    else:
        raise RoutesError(
            f"sample {sample}: routed_experts has {layers} layers; the model has "
            f"{num_layers if num_layers is not None else '?'} layers, {len(moe_layers)} of them MoE")
    ids = arr[:, layer_ids, :].astype(np.int64)
    bad = ids >= num_experts
    if bad.any():
        t, l, _ = np.argwhere(bad)[0]
        raise RoutesError(
            f"sample {sample}, layer {int(moe_layers[l])} (MoE layer {int(l)}), token {int(t)}: "
            f"expert id {int(ids[t, l].max())} >= num_experts {num_experts}")
    out = np.full((num_tokens, len(layer_ids), k), -1, dtype=np.int32)
    out[:rows] = np.where(ids < 0, -1, ids)
    return out


def from_jagged(routed_experts, seq_lens: Sequence[int], **kw) -> list[np.ndarray]:
    """verl V1 layout: a jagged (nested) tensor or a list of per-sample arrays -> normalised per sample."""
    parts = list(routed_experts.unbind()) if getattr(routed_experts, "is_nested", False) else list(routed_experts)
    if len(parts) != len(seq_lens):
        raise RoutesError(f"routed_experts has {len(parts)} samples for {len(seq_lens)} sequences")
    return [normalize_sample(p, num_tokens=int(n), sample=i, **kw) for i, (p, n) in enumerate(zip(parts, seq_lens))]


def from_padded(routed_experts, attention_mask, **kw) -> list[np.ndarray]:
    """Legacy DataProto layout [bsz, P + R, L_all, K] with attention_mask [bsz, P + R] -> per sample.

    Rows where attention_mask is 1 are the sample's tokens in order (left-padded prompt, right-padded
    response); the padding rows are dropped.
    """
    arr = _as_numpy(routed_experts)
    mask = _as_numpy(attention_mask).astype(bool)
    if arr.ndim != 4 or mask.shape != arr.shape[:2]:
        raise RoutesError(
            f"padded routed_experts must be [bsz, seq, layers, topk] with attention_mask [bsz, seq]; "
            f"got {arr.shape} and {mask.shape}")
    return [normalize_sample(arr[i][mask[i]], num_tokens=int(mask[i].sum()), sample=i, **kw)
            for i in range(arr.shape[0])]


def from_request_output(request_output, *, num_tokens: int | None = None, output_index: int = 0,
                        **kw) -> np.ndarray | None:
    """vLLM `RequestOutput` -> normalised routes of completion `output_index`, None if vLLM returned none.

    Reads `request_output.outputs[i].routed_experts` ([prompt + generated - 1, L_all, K], vLLM >= 0.22 with
    --enable-return-routed-experts); num_tokens defaults to len(prompt_token_ids) + len(token_ids).
    """
    outputs = getattr(request_output, "outputs", None) or []
    if output_index >= len(outputs):
        return None
    completion = outputs[output_index]
    routes = getattr(completion, "routed_experts", None)
    if routes is None:
        return None
    if num_tokens is None:
        num_tokens = len(request_output.prompt_token_ids or []) + len(completion.token_ids)
    return normalize_sample(routes, num_tokens=num_tokens, sample=getattr(request_output, "request_id", 0), **kw)
