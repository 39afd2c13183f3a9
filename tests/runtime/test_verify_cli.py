"""`relibra-verl verify`: user errors exit 2 without spawning; a small real run is exact and balances."""
from __future__ import annotations

import json

import pytest

from relibra_verl.cli import main


@pytest.mark.parametrize("argv", [
    ["--ep", "3", "--gpus-per-node", "2", "--trace", "bundled:esft_law"],
    ["--ep", "5", "--gpus-per-node", "5", "--trace", "bundled:esft_law"],  # 64 experts % 5
    ["--ep", "4", "--gpus-per-node", "2", "--trace", "bundled:nope"],
    ["--ep", "4", "--gpus-per-node", "2", "--trace", "/nonexistent.npz"],
    ["--ep", "4", "--gpus-per-node", "2", "--trace", "bundled:esft_law", "--replica-slots", "-1"],
])
def test_bad_input_exits_2(argv, capsys):
    assert main(["verify", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relibra-verl verify: error:") and "Traceback" not in err


def test_small_run_is_exact_and_balances(tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = main(["verify", "--ep", "4", "--gpus-per-node", "2", "--trace", "bundled:esft_law", "--replica-slots", "2",
               "--layers", "2", "--tokens-per-rank", "64", "--json", str(out), "--timeout", "120"])
    rep = json.loads(out.read_text())
    assert rc == 0 and rep["ok"] is True and rep["exact"] is True and rep["max_rel_diff"] <= 1e-5
    assert rep["nonfinite"] == [] and rep["balance_as_planned"] is True
    assert rep["replica_tokens"] == rep["replica_tokens_planned"] > 0
    assert rep["tokens_per_rank_after"] == rep["tokens_per_rank_after_planned"]
    assert rep["imbalance_after"] < rep["imbalance_before"]
    assert sum(rep["tokens_per_rank_before"]) == sum(rep["tokens_per_rank_after"])
    assert {"output", "input_grad", "router_grad", "expert_weight_grad"} <= set(rep["diffs"])
    assert rep["replica_sync_bytes"] > 0 and rep["grad_reduce_bytes"] > 0 and rep["peak_extra_memory_bytes"] > 0
    # send-ahead (default): nothing fetched on demand; the pool is at most 2 x R expert slots (a buffer is
    # allocated on first receipt)
    assert rep["prefetch"] and rep["replica_fetches"]["ahead"] > 0 and rep["replica_fetches"]["blocking"] == 0
    expert_bytes = 2 * rep["config"]["hidden"] * rep["config"]["ffn"] * 4  # fc1 + fc2, fp32
    assert 0 < rep["replica_pool_bytes_per_rank"] <= 2 * 2 * expert_bytes
    # one reorder with Megatron DistributedOptimizer state: bf16 weights, fp32 main params (2x), Adam m+v (4x)
    k = rep["migration_bytes_by_kind"]
    assert rep["config"]["migration_optimizer"] == ["DistributedOptimizer", "DistributedOptimizer"]
    assert k["weights"] > 0 and k["main_params"] == 2 * k["weights"] and k["optimizer_state"] == 4 * k["weights"]
    assert rep["migration_bytes"] == sum(k.values())
    out = capsys.readouterr().out
    assert "EXACT" in out and "Adam m+v" in out and "send-ahead on" in out


@pytest.mark.parametrize("experts,permute", [("grouped", "triton")])  # the suite covers each path alone
def test_experts_and_permute_paths(tmp_path, experts, permute):
    out = tmp_path / "v.json"
    rc = main(["verify", "--ep", "4", "--gpus-per-node", "2", "--trace", "bundled:esft_law", "--replica-slots", "2",
               "--layers", "1", "--tokens-per-rank", "32", "--experts", experts, "--permute", permute,
               "--json", str(out), "--timeout", "180"])
    rep = json.loads(out.read_text())
    assert rc == 0 and rep["exact"] and rep["balance_as_planned"] and rep["replica_tokens"] > 0
    assert rep["config"]["experts_impl"] == {"grouped": "TEGroupedMLP", "sequential": "SequentialMLP"}[experts]
    assert set(rep["permute_calls"]) == {"triton" if permute == "triton" else "megatron"}
    if experts == "grouped":
        assert rep["grad_returns_async"] > 0


@pytest.mark.parametrize("value", ["nan"])  # Inf: test_diff_counts_nonfinite_as_not_exact
def test_nonfinite_is_not_exact(tmp_path, capsys, value):
    """One NaN/Inf in the input of both runs: the outputs hold it identically, and verify still says NOT EXACT
    (a NaN must never count as a zero difference)."""
    out = tmp_path / "v.json"
    rc = main(["verify", "--ep", "4", "--gpus-per-node", "2", "--trace", "bundled:esft_law", "--replica-slots", "2",
               "--layers", "1", "--tokens-per-rank", "16", "--inject-nonfinite", value, "--json", str(out),
               "--timeout", "180"])
    rep = json.loads(out.read_text())  # strict JSON: non-finite figures are null
    assert rc == 1 and rep["exact"] is False and rep["ok"] is False
    assert rep["max_rel_diff"] is None and "layer0.output" in rep["nonfinite"]
    text = capsys.readouterr().out
    assert "NOT EXACT" in text and "non-finite values" in text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["reference", "result", "both"])
def test_diff_counts_nonfinite_as_not_exact(bad, where):
    import torch

    from relibra_verl.runtime import harness

    a, b = torch.ones(3, 4), torch.ones(3, 4)
    if where in ("reference", "both"):
        a[1, 2] = bad
    if where in ("result", "both"):
        b[1, 2] = bad
    assert harness.diff(a, b) == (float("inf"), float("inf"))
    assert harness.max_rel([(torch.ones(2), torch.ones(2)), (a, b)]) == float("inf")
    assert not harness.max_rel([(a, b)]) <= 1e-5
    assert harness.diff(torch.ones(2), torch.tensor([1.0, 1.5])) == (0.5, 0.5)  # finite: the plain figures
