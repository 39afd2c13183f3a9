"""Permutation over physical slots with relibra's kernels inside the runtime (4 gloo ranks): Triton's
interpreter on CPU against stock Megatron, and a `moe_permute_fusion=True` configuration accepted with
relibra's permute in place of Transformer Engine's. The shared fixture runs every rank under a timeout."""
from __future__ import annotations

import pytest
from test_dispatch_exact import FP32_TOL, _case, _max_rel


@pytest.mark.parametrize("name,path", [("triton_permute", "triton"), ("grouped_triton_permute", "triton"),
                                       ("fusion_asked_torch_reference", "torch"), ("random_r2_s0", "megatron")])
def test_permute_path_exact_and_counted(megatron_suite, name, path):
    res = _case(megatron_suite, name)
    assert _max_rel(res) <= FP32_TOL
    assert res[0]["has_replicas"] and res[0]["before"] != res[0]["after"]
    for x in res:
        assert x["permute_calls"] == {path: 1}, x["permute_calls"]


def test_triton_on_cpu_without_interpreter_is_refused_by_name(megatron_suite):
    errs = [r["triton_without_interpreter"] for r in megatron_suite]
    assert all(e.get("error") == "ValueError" and "TRITON_INTERPRET=1" in e["message"] for e in errs), errs
