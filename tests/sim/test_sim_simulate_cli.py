"""`relibra-verl simulate --model ... --profile ...`: step time in the table and JSON, plot, bad input."""
from __future__ import annotations

import json

import pytest

from relibra_verl.cli import main

BOTH = ["--trace", "bundled:esft_intent", "--trace", "bundled:esft_law"]
SMALL = ["--ep", "8", "--gpus-per-node", "4", "--replica-slots", "2", "--tokens-per-rank", "1024", "--no-progress"]


def test_simulate_with_model_reports_step_time(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["simulate", *BOTH, *SMALL, "--steps", "2", "--model", "deepseek-v2-lite", "--profile", "h800-ib400",
                 "--strategies", "megatron,eplb-oracle,relibra,ideal", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "step time (deepseek-v2-lite on h800-ib400" in out and "time-aware planning (relibra)" in out
    r = json.loads(js.read_text())
    s = r["strategies"]
    for name in ("megatron", "eplb-oracle", "relibra", "ideal"):
        assert {"step_time_s", "throughput_vs_megatron", "throughput_vs_ideal", "imbalance"} <= set(s[name])
        assert s["ideal"]["step_time_s"] <= s[name]["step_time_s"]
    assert s["megatron"]["throughput_vs_megatron"] == pytest.approx(1.0)
    assert r["config"]["replica_limits_from"] == "cost model" and r["config"]["min_replica_tokens"] > 1
    assert r["timing"]["profile"] == "h800-ib400"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_synthetic(tmp_path, capsys):
    js = tmp_path / "r.json"
    assert main(["simulate", "--synthetic", "--model", "deepseek-v2-lite", "--seqs", "12", "--mean-len", "300",
                 "--ep", "4", "--gpus-per-node", "2", "--tokens-per-rank", "1024", "--steps", "2", "--no-progress",
                 "--strategies", "megatron,eplb-history,relibra,ideal", "--online-copies", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["config"]["traces"] == ["synthetic:deepseek-v2-lite"] and r["config"]["replica_copies"] == "critical path"
    assert set(r["strategies"]) == {"megatron", "eplb-history", "relibra", "ideal"}
    assert all(v["throughput_vs_ideal"] <= 1.0 + 1e-9 for v in r["strategies"].values())


@pytest.mark.parametrize("extra, needle", [
    (["--model", "qwen3-30b-a3b"], "64 experts per layer but preset qwen3-30b-a3b has 128"),
    (["--model", "deepseek-v2-lite", "--profile", "b200-ib800"], "unknown hardware profile 'b200-ib800'"),
    (["--model", "mixtral"], "unknown model preset 'mixtral'"),
    (["--plot", "x.png"], "--plot needs --model"),
    (["--steps", "2", "--eplb-interval", "0"], "eplb-periodic window and interval must be >= 1"),
])
def test_simulate_bad_input_exit_2(extra, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", *BOTH, *SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_simulate_profile_missing_constant_and_synthetic_flags(tmp_path, capsys):
    prof = tmp_path / "p.yaml"
    prof.write_text("name: mine\nnvlink_a2a_GBps: 300\n")
    assert main(["simulate", *BOTH, *SMALL, "--model", "deepseek-v2-lite", "--profile", str(prof)]) == 2
    assert "missing constant" in capsys.readouterr().err
    assert main(["simulate", "--synthetic", "--seqs", "4", *SMALL]) == 2
    assert "--synthetic needs --model" in capsys.readouterr().err
    assert main(["simulate", "--synthetic", "--model", "deepseek-v2-lite", *SMALL]) == 2
    assert "--seqs" in capsys.readouterr().err
    assert main(["simulate", *SMALL]) == 2
    assert "give --trace" in capsys.readouterr().err


def test_simulate_eplb_periodic_and_runtime_columns(tmp_path, capsys):
    """eplb-periodic at a one-micro-batch interval rebalances every step; relibra and EPLB pay their runtime
    costs, megatron and ideal none; the flags land in the JSON."""
    js = tmp_path / "r.json"
    assert main(["simulate", *BOTH, *SMALL, "--resample", "60", "--steps", "3", "--model", "deepseek-v2-lite",
                 "--strategies", "megatron,eplb-periodic,relibra,ideal", "--eplb-interval", "1", "--eplb-window", "5",
                 "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert (r["config"]["eplb_window"], r["config"]["eplb_interval"]) == (5, 1)
    s = r["timing"]["strategies"]
    assert s["eplb-periodic"]["breakdown_s"]["runtime"] > 0 and s["relibra"]["breakdown_s"]["runtime"] > 0
    assert s["megatron"]["breakdown_s"]["runtime"] == 0 and s["ideal"]["breakdown_s"]["runtime"] == 0
    assert r["strategies"]["eplb-periodic"]["moved_experts_per_step"] > 0
    assert "runtime" in capsys.readouterr().out
