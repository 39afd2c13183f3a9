"""routed_experts capture: vLLM's request output, verl's V1 (jagged) and legacy (padded) layouts."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from relibra_verl.integration.routes import (RoutesError, from_jagged, from_padded, from_request_output,
                                             moe_layer_indices, normalize_sample)
from relibra_verl.routing.loads import counts_from_routes

E, K = 8, 2
L_ALL = 4
MOE = moe_layer_indices(L_ALL, [0, 1, 0, 1])  # layers 1 and 3 are MoE, 0 and 2 dense


# vLLM >= 0.22 request output, field for field (vllm/outputs.py: CompletionOutput, RequestOutput);
# routed_experts: np.ndarray [seq_len, layer_num, topk] int16, seq_len = prompt + generated - 1.
@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: Any
    routed_experts: np.ndarray | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    lora_request: Any = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: Any
    outputs: list
    finished: bool
    num_cached_tokens: int | None = None


def _sample_routes(rng, n, layers=L_ALL, dtype=np.int16):
    r = rng.integers(0, E, size=(n, layers, K)).astype(dtype)
    r[:, [0, 2]] = 0  # vLLM reports zeros for dense layers
    return r


def test_vllm_request_output_replayed():
    rng = np.random.default_rng(0)
    prompt, gen = [5, 6, 7], [8, 9, 10, 11]
    routes = _sample_routes(rng, len(prompt) + len(gen) - 1)
    out = RequestOutput("req-3", None, prompt, None,
                        [CompletionOutput(0, "", gen, None, None, routes, "stop")], True)
    got = from_request_output(out, num_experts=E, moe_layers=MOE, num_layers=L_ALL)
    assert got.shape == (7, 2, K) and got.dtype == np.int32
    assert (got[:6] == routes[:, [1, 3]]).all() and (got[6] == -1).all()  # last token: unknown
    none = RequestOutput("r", None, prompt, None, [CompletionOutput(0, "", gen, None, None)], True)
    assert from_request_output(none, num_experts=E, moe_layers=MOE, num_layers=L_ALL) is None


@pytest.mark.parametrize("dtype", [np.int16, np.int64, np.uint8, np.int32])
def test_any_int_dtype(dtype):
    rng = np.random.default_rng(1)
    r = _sample_routes(rng, 5, dtype=dtype)
    got = normalize_sample(torch.from_numpy(r) if dtype != np.uint8 else r, num_tokens=6, num_experts=E,
                           moe_layers=MOE, num_layers=L_ALL)
    assert (got[:5] == r[:, [1, 3]].astype(np.int64)).all() and (got[5] == -1).all()


def test_negative_ids_become_missing_and_moe_only_input_accepted():
    r = np.full((4, 2, K), 3, np.int64)
    r[1, 0, 1] = -1
    got = normalize_sample(r, num_tokens=4, num_experts=E, moe_layers=MOE, num_layers=L_ALL)
    assert got[1, 0, 1] == -1 and (got[0] == 3).all()


def test_errors_name_sample_and_layer():
    r = np.zeros((5, L_ALL, K), np.int16)
    with pytest.raises(RoutesError, match="sample 2: routed_experts has 5 rows for 8 tokens"):
        from_jagged([np.zeros((7, L_ALL, K), np.int16)] * 2 + [r], [8, 8, 8], num_experts=E, moe_layers=MOE,
                    num_layers=L_ALL)
    r = np.zeros((7, L_ALL, K), np.int16)
    r[4, 3, 1] = E  # MoE layer 1 = decoder layer 3
    with pytest.raises(RoutesError, match=r"sample 1, layer 3 \(MoE layer 1\), token 4: expert id 8 >= num_experts 8"):
        from_jagged([np.zeros((7, L_ALL, K), np.int16), r], [8, 8], num_experts=E, moe_layers=MOE,
                    num_layers=L_ALL)
    with pytest.raises(RoutesError, match="sample 0: routed_experts has 3 layers"):
        normalize_sample(np.zeros((7, 3, K), np.int16), num_tokens=8, num_experts=E, moe_layers=MOE,
                         num_layers=L_ALL)


def test_padded_legacy_layout_equals_jagged_v1_layout():
    """The same three samples in both verl layouts normalise to the same routes and the same loads."""
    rng = np.random.default_rng(2)
    prompts, resps = [3, 5, 2], [4, 1, 6]
    P, R = max(prompts), max(resps)
    per_sample = [_sample_routes(rng, p + r - 1) for p, r in zip(prompts, resps)]
    # V1: one unpadded int16 tensor per sample, jagged, [prompt + response - 1, L_all, K]
    jag = torch.nested.as_nested_tensor([torch.from_numpy(x) for x in per_sample], layout=torch.jagged)
    v1 = from_jagged(jag, [p + r for p, r in zip(prompts, resps)], num_experts=E, moe_layers=MOE,
                     num_layers=L_ALL)
    # legacy: [bsz, P + R, L_all, K], prompt left-padded, response right-padded, as verl's agent loop fills it
    padded = np.zeros((3, P + R, L_ALL, K), np.int64)
    mask = np.zeros((3, P + R), np.int64)
    for i, (p, r, x) in enumerate(zip(prompts, resps, per_sample)):
        start = P - p
        padded[i, start:start + len(x)] = x
        mask[i, start:P + r] = 1
    legacy = from_padded(torch.from_numpy(padded), torch.from_numpy(mask), num_experts=E, moe_layers=MOE,
                         num_layers=L_ALL)
    for a, b in zip(v1, legacy):
        assert a.shape == b.shape
        assert (a[:-1] == b[:-1]).all()  # the padded layout holds a zero row where V1 has no route
    loads_v1 = counts_from_routes(np.concatenate([a[:-1] for a in v1]), E)
    loads_legacy = counts_from_routes(np.concatenate([b[:-1] for b in legacy]), E)
    assert (loads_v1 == loads_legacy).all() and loads_v1.sum() == sum(len(x) for x in per_sample) * 2 * K
