"""Megatron-on-CPU fixtures: one 4-rank gloo run (EP 4 = 2 nodes x 2) shared by the runtime tests."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import _suite by name


@pytest.fixture(scope="session")
def megatron_suite():
    """Results of every case in _suite.CASES, per rank: list[dict name -> result]."""
    import megatron.core

    assert megatron.core.__version__.split("+")[0] == "0.19.2", megatron.core.__version__
    import _suite

    from relibra_verl.runtime.launch import spawn_ranks

    return spawn_ranks(_suite.run_cases, 4, list(_suite.CASES), timeout=480)
