"""A tiny model and a round-number hardware profile whose costs can be computed by hand (sim tests)."""
import numpy as np

from relibra_verl.sim.presets import ModelPreset, SkewTarget
from relibra_verl.sim.profiles import profile_from_dict

# E=4, K=2, H=8, I=4: one expert = 3*8*4 = 96 params; attention 100 params; 1 dense layer (FFN 16); vocab 10.
TINY = ModelPreset("tiny", num_layers=2, num_moe_layers=1, num_experts=4, topk=2, hidden=8, moe_intermediate=4,
                   num_expert_groups=1, topk_groups=1, num_shared_experts=0, dense_intermediate=16, attn_params=100,
                   attn_heads=1, attn_qk_dim=4, attn_v_dim=4, vocab=10, skew=SkewTarget(1, 1, 0.1, 0.5, "test"))
# round numbers: 1 GB/s NVLink, 0.5 GB/s IB, 2 GB/s copies, 1 GFLOP/s, 1 GB/s HBM
ROUND = profile_from_dict(dict(
    name="round", nvlink_a2a_GBps=1.0, ib_a2a_GBps=0.5, nvlink_p2p_GBps=2.0, ib_bulk_GBps=1.0, a2a_latency_us=0.0,
    gemm_tflops=1e-3, hbm_GBps=1.0, gemm_call_overhead_us=0.0, dense_tflops=1e-3, bwd_compute_factor=2.0,
    act_bytes=2.0, weight_bytes_per_param=2.0, grad_bytes_per_param=4.0, state_bytes_per_param=14.0,
    replica_contention_share=0.1, migration_exposed_share=0.5, ib_forwarding=0), "test")
NODES = np.array([0, 0, 1, 1])  # G=4 as 2 nodes x 2
TRAFFIC = np.array([[10, 2, 3, 0],
                    [0, 5, 0, 4],
                    [1, 0, 6, 0],
                    [0, 0, 2, 8]], dtype=float)[None, None]  # [M=1, L=1, src, dst]
NS = 1e-9
