"""bench/calibrate_gpu.py: the CPU dry run writes a profile that loads; the a + b*M fit recovers known values."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from relibra_verl.sim.cost import expert_gemm_coeffs
from relibra_verl.sim.presets import get_preset
from relibra_verl.sim.profiles import load_profile

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "calibrate_gpu.py")


def _module():
    spec = importlib.util.spec_from_file_location("calibrate_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_recovers_a_and_b():
    mod = _module()
    tokens = [32, 128, 512, 2048, 8192]
    a, b = mod.fit_ab(tokens, [20e-6 + 50e-9 * m for m in tokens])
    assert a == pytest.approx(20e-6, rel=1e-6) and b == pytest.approx(50e-9, rel=1e-6)


def test_dry_run_writes_loadable_profile(tmp_path, capsys):
    pytest.importorskip("torch")
    mod = _module()
    out = tmp_path / "p.json"
    assert mod.main(["--dry-run", "--out", str(out), "--presets", "deepseek-v2-lite", "--base", "h800-ib400"]) == 0
    raw = json.loads(out.read_text())
    assert raw["base"] == "h800-ib400" and "deepseek-v2-lite" in raw["gemm_fit"]
    prof = load_profile(str(out))
    fit = raw["gemm_fit"]["deepseek-v2-lite"]
    # a measured fit replaces the derived expert time for that preset
    a, b = expert_gemm_coeffs(get_preset("deepseek-v2-lite"), prof)
    assert a == pytest.approx(fit["a_us"] * 1e-6) and b == pytest.approx(fit["b_ns_per_token"] * 1e-9)
    assert prof.nvlink_a2a_GBps == load_profile("h800-ib400").nvlink_a2a_GBps  # links from the base
