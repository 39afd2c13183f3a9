"""relibra in verl 0.9.1: config glue, routing capture, per-micro-batch planning in the Megatron engine.

  plugin          the `verl.plugins` entry point / external_lib module: version checks, patch registration
  routes          normalise `routed_experts` (vLLM request outputs, verl V1 jagged and legacy padded layouts)
  microbatch      loads of one verl micro-batch over exactly the rows R3 replays on this rank
  trainer         RelibraTrainer: loads -> EP all-gather -> plan -> runtime, metrics, reordering, export
  runtime_bridge  the single seam to relibra_verl.runtime
The verl wrappers themselves live in relibra_verl/patches (verl_engine.py, vllm_routed_experts.py).
Importing this package imports nothing heavy (the entry point runs on every `import verl`).
"""
