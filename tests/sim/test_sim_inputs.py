"""Presets, profiles, bad input (clear UsageError / exit 2 with one line)."""
from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from relibra_verl.cli import main
from relibra_verl.errors import UsageError
from relibra_verl.planner.types import Topology
from relibra_verl.sim.presets import PRESETS, get_preset
from relibra_verl.sim.profiles import BUILTIN, REQUIRED, load_profile
from relibra_verl.sim.report import simulate_timing


def test_presets_match_facts():
    # facts.md "Model shapes": bf16 per expert 9.4 / 37.7 / 88 / 17.3 MB
    mb = {n: get_preset(n).expert_params * 2 / 1e6 for n in PRESETS}
    assert mb == pytest.approx({"qwen3-30b-a3b": 9.4, "qwen3-235b-a22b": 37.7, "deepseek-v3": 88.1,
                                "deepseek-v2-lite": 17.3}, rel=0.01)
    v3 = get_preset("deepseek-v3")
    assert (v3.num_moe_layers, v3.num_experts, v3.topk, v3.num_expert_groups, v3.topk_groups) == (58, 256, 8, 8, 4)


def test_builtin_profiles_complete():
    for name in BUILTIN:
        p = load_profile(name)
        assert p.name == name
        for key in REQUIRED:
            assert getattr(p, key) >= 0


def test_unknown_preset_and_profile():
    with pytest.raises(UsageError, match="unknown model preset 'gpt-moe'"):
        get_preset("gpt-moe")
    with pytest.raises(UsageError, match="unknown hardware profile 'b200'"):
        load_profile("b200")


def test_profile_file_missing_constant(tmp_path):
    raw = dict(BUILTIN["h100-ib400"])
    del raw["ib_a2a_GBps"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(UsageError, match="missing constant 'ib_a2a_GBps'"):
        load_profile(str(path))
    yml = tmp_path / "p.yaml"
    yml.write_text("name: mine\nhbm_GBps: 3000\n")
    with pytest.raises(UsageError, match="missing constant"):
        load_profile(str(yml))


def test_profile_file_with_base_and_bad_values(tmp_path):
    yml = tmp_path / "p.yaml"
    yml.write_text("base: h800-ib400\nname: mine\nib_a2a_GBps: 25\n")
    p = load_profile(str(yml))
    assert (p.name, p.ib_a2a_GBps, p.nvlink_a2a_GBps) == ("mine", 25.0, BUILTIN["h800-ib400"]["nvlink_a2a_GBps"])
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"base": "h100-ib400", "ib_a2a_GBps": "fast"}))
    with pytest.raises(UsageError, match="'ib_a2a_GBps' must be a number"):
        load_profile(str(bad))
    bad.write_text(json.dumps({"base": "h100-ib400", "nvlink_speed": 1}))
    with pytest.raises(UsageError, match="unknown constant 'nvlink_speed'"):
        load_profile(str(bad))
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not readable"):
        load_profile(str(bad))


def test_trace_shape_must_match_preset():
    topo = Topology(64, 8, 8, 2)
    r = types.SimpleNamespace(rank_tokens=np.ones((1, 26, 8)), traffic=np.ones((1, 26, 8, 8)),
                              replicas=np.zeros((1, 26, 8)), moved_experts=np.zeros(26), plan_ms=0.0)
    with pytest.raises(UsageError, match="64 experts per layer but preset qwen3-30b-a3b has 128"):
        simulate_timing({"megatron": [r]}, "qwen3-30b-a3b", "h100-ib400", topo)
    with pytest.raises(UsageError, match="26 MoE layers but preset"):
        simulate_timing({"megatron": [r]}, dataclasses.replace(get_preset("deepseek-v2-lite"), num_moe_layers=27),
                        "h100-ib400", topo)


@pytest.mark.parametrize("argv, needle", [
    (["synth", "--model", "gpt-moe", "--seqs", "2", "--out", "x.npz"], "unknown model preset"),
    (["synth", "--model", "deepseek-v2-lite", "--seqs", "0", "--out", "x.npz"], "--seqs"),
    (["synth-stats", "--model", "nope"], "unknown model preset"),
])
def test_cli_bad_input_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
