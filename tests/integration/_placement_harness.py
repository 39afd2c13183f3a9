"""Two data placements of one mini-batch on verl's real Megatron engine path (EP 2 on gloo, the harness of
_engine_harness): the same sequences, held by different DP ranks."""
from __future__ import annotations

import numpy as np
import torch

# sequence ids each rank holds: verl's contiguous halves, and a placement that swaps half of them
PLACEMENTS = {"verl": [[0, 1, 2, 3], [4, 5, 6, 7]], "moved": [[0, 5, 2, 7], [4, 1, 6, 3]]}


def select(td, rows):
    """The rows of a jagged verl TensorDict (its non-tensor entries kept). Each sequence's last token leaves
    the loss: _engine_harness._loss takes the next token of the packed micro-batch as its label, which for a
    last token is another sequence's (a harness shortcut; verl's log-probs shift within each sequence)."""
    from verl.utils import tensordict_utils as tu

    fields = {}
    for key in ("input_ids", "response_mask", "loss_mask", "routed_experts"):
        seqs = list(td[key].unbind())
        if key == "loss_mask":
            seqs = [torch.cat([m[:-1], torch.zeros_like(m[-1:])]) for m in seqs]
        fields[key] = torch.nested.as_nested_tensor([seqs[r] for r in rows], layout=torch.jagged)
    return tu.get_tensordict(fields, non_tensor_dict={"use_dynamic_bsz": True, "max_token_len_per_gpu": 20,
                                                     "enable_routing_replay": True})


def run(rank: int, world: int, steps: int = 2) -> dict:
    """For each placement, relibra off and on: two optimizer steps on the same 8 sequences; this rank's
    losses and the canonical expert weights it exports after the steps."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import _engine_harness as eh
    from _data import v1_batch

    from relibra_verl.config import RelibraConfig

    ti = eh._setup(world)
    cfg = RelibraConfig(enable=True, mode="both", replica_slots=1, gpus_per_node=world, reorder_every=1, profile="none")
    out = {}
    for relibra, rc in (("off", None), ("on", cfg)):
        for name, placement in PLACEMENTS.items():
            eng = eh.build_engine(ti, rc)
            losses = []
            for step in range(steps):
                data = v1_batch(40 + step, 8, eh.E, eh.K, eh.L_ALL, max_len=10, max_token_len=20, skew=1.5)
                res = eng.train_batch(select(data, placement[rank]), eh._loss)
                losses.append(float(np.sum(res["loss"])))
            gen, _ = eng.get_per_tensor_param()
            out[(relibra, name)] = {"losses": losses, "export": {n: t.numpy().copy() for n, t in gen}}
    return out
