"""Hardware profiles: they live with the planner (relibra_verl.planner.hardware), which derives its
time-aware configuration from them without importing the simulator; the simulator's modules, commands and
tests import them from here too."""
from relibra_verl.planner.hardware import (  # noqa: F401
    BUILTIN, OPTIONAL, REQUIRED, HardwareProfile, load_profile, profile_from_dict, profile_to_dict)
