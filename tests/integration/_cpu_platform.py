"""Test-only verl platform plugin: verl's device layer on a CPU-only machine (gloo, device "cpu").

Loaded the way verl loads any hardware plugin: `VERL_USE_EXTERNAL_MODULES=_cpu_platform` (imported by
`import verl`, before any verl module that freezes the device name, e.g. router_replay_utils) and selected
with `VERL_PLATFORM=cpu_test`. Never used on GPU machines.
"""
from __future__ import annotations

from verl.plugin.platform.platform_cuda import PlatformCUDA
from verl.plugin.platform.platform_manager import PlatformRegistry

NAME = "cpu_test"


@PlatformRegistry.register(platform=NAME)
class PlatformCPUTest(PlatformCUDA):
    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return True

    def current_device(self):
        return "cpu"

    def device_count(self) -> int:
        return 0

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def communication_backend_name(self) -> str:
        return "gloo"
