"""verl-integration tests: verl 0.9.1 and megatron-core 0.19.2 themselves, on CPU."""
from __future__ import annotations

import importlib.metadata
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import _engine_harness by name


def pytest_sessionstart(session):
    assert importlib.metadata.version("verl") == "0.9.1"
    assert importlib.metadata.version("megatron-core") == "0.19.2"
