"""The trainer plans without the simulator: importing the planner (its configs and hardware profiles
included) and the verl trainer does not import relibra_verl.sim."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
import {modules}
from relibra_verl.planner import ExpertShape, load_profile, planner_configs
planner_configs(ExpertShape(2048, 768), load_profile("h100-ib400"), 4, 8)
loaded = sorted(m for m in sys.modules if m == "relibra_verl.sim" or m.startswith("relibra_verl.sim."))
print(",".join(loaded))
"""


@pytest.mark.parametrize("modules", ["relibra_verl.planner", "relibra_verl.planner, relibra_verl.integration.trainer"])
def test_planner_and_trainer_do_not_import_the_simulator(modules):
    out = subprocess.run([sys.executable, "-c", CHECK.format(modules=modules)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"imported the simulator: {out.stdout.strip()}"


def test_the_simulator_reexports_the_planners_hardware_profiles():
    from relibra_verl.planner import hardware
    from relibra_verl.sim import cost, profiles

    assert profiles.load_profile is hardware.load_profile and profiles.HardwareProfile is hardware.HardwareProfile
    assert cost.expert_gemm_coeffs is hardware.expert_gemm_coeffs
