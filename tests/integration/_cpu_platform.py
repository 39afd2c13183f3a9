"""Test-only registration of relibra's CPU platform class (patches/cpu_platform.py) under its own name.

Loaded the way verl loads any hardware plugin: `VERL_USE_EXTERNAL_MODULES=_cpu_platform` (imported by
`import verl`, before any verl module that freezes the device name, e.g. router_replay_utils) and selected
with `VERL_PLATFORM=cpu_test`. The name differs from `relibra_cpu` so that none of the e2e run's module
adaptations are installed in the test harness. Never used on GPU machines.
"""
from __future__ import annotations

from verl.plugin.platform.platform_manager import PlatformRegistry

from relibra_verl.patches.cpu_platform import platform_class

NAME = "cpu_test"

PlatformRegistry.register(platform=NAME)(platform_class())
