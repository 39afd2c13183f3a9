"""Step-time simulator: what each balancing strategy does to MoE training throughput.

  presets   model shapes (qwen3-30b-a3b, qwen3-235b-a22b, deepseek-v3, deepseek-v2-lite)
  profiles  hardware constants with sources (h100-ib400, h800-ib400, or a JSON/YAML file)
  cost      seconds per (micro-batch, MoE layer), fwd and bwd, from a planner StrategyResult
  overheads the balancing runtime's own per-step costs (loads collective, plan agreement, install)
  baselines eplb-periodic and eplb-oracle over a run (rebalance schedule, keep-or-move)
  planning  time-aware planner inputs (min_replica_tokens, max_copies_per_owner, ...)
  synth     synthetic RL-like routing calibrated to real skew, and routing statistics
  report    simulate_timing (step time, throughput vs megatron / ideal, the ideal as a lower bound),
            text table, PNG plot

Shapes: M micro-batches, L MoE layers, G EP ranks, E experts, K top-k, H hidden, I expert intermediate.
Every constant comes from ../shared/reference/facts.md or is marked as an assumption at its definition.
"""
