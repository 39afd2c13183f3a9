"""Time-aware planning inputs: they live with the planner (relibra_verl.planner.configs); the simulator's
modules and tests import them from here too."""
from relibra_verl.planner.configs import (  # noqa: F401
    ExpertShape, _pair_costs, copy_cost_pairs, exposed_copy_seconds, inter_node_share, max_copies_per_owner,
    migration_pairs, migration_seconds_per_expert, min_replica_tokens, move_cost_pairs, pair_seconds,
    planner_configs, planner_limits, rank_move_cost_pairs, replica_copy_seconds, replica_overhead_tokens)
