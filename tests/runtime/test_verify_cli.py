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
    assert rc == 0 and rep["exact"] is True and rep["max_rel_diff"] <= 1e-5
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
