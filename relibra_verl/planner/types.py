"""Plan data: what the planners produce and the runtime executes.

Glossary (see ../shared/design.md):
  E  routed experts per MoE layer          K  top-k          L  MoE layers
  G  EP ranks, N nodes, g = G // N ranks per node            M  micro-batches
  S  home slots per rank (= E // G, Megatron's num_local_experts)
  R  replica slots per rank
  physical slot space: rank r owns slots [r*(S+R), (r+1)*(S+R)), home slots first, then replica slots.
  placement: which logical expert sits in each home slot (a permutation of E per layer).
  copy c of expert e: c = 0 is the home copy, c >= 1 are replicas (same node as the home).
  quota q[r, e, c]: how many of source rank r's (token, k) pairs for e go to copy c, in token order;
      pairs beyond sum_c q[r, e, c] go home, so any actual routing is dispatched correctly.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np


class PlanError(ValueError):
    """A plan, topology or load array violates a documented contract."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """The EP group and its slot budget.

    node_of_rank: [G] node index of every EP rank (default: r // gpus_per_node).
    """

    num_experts: int
    ep_size: int
    gpus_per_node: int
    replica_slots: int = 0
    node_of_rank: tuple[int, ...] | None = None

    def __post_init__(self):
        E, G, g, R = self.num_experts, self.ep_size, self.gpus_per_node, self.replica_slots
        if G < 1 or g < 1 or E < 1 or R < 0:
            raise PlanError(f"topology needs E >= 1, G >= 1, gpus_per_node >= 1, R >= 0; got E={E} G={G} g={g} R={R}")
        if E % G:
            raise PlanError(f"num_experts {E} is not divisible by the EP size {G}: Megatron needs E % EP == 0")
        if self.node_of_rank is None:
            if G % g and G > g:
                raise PlanError(f"EP size {G} is not a multiple of gpus_per_node {g}")
            object.__setattr__(self, "node_of_rank", tuple(r // g for r in range(G)))
        if len(self.node_of_rank) != G:
            raise PlanError(f"node_of_rank has {len(self.node_of_rank)} entries, EP size is {G}")
        sizes = np.bincount(np.asarray(self.node_of_rank))
        if (sizes == 0).any() or len(set(sizes.tolist())) != 1:
            raise PlanError(f"every node must hold the same number of EP ranks; got {sizes.tolist()}")

    @property
    def E(self) -> int:
        return self.num_experts

    @property
    def G(self) -> int:
        return self.ep_size

    @property
    def S(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def R(self) -> int:
        return self.replica_slots

    @property
    def num_nodes(self) -> int:
        return int(max(self.node_of_rank)) + 1

    @property
    def ranks_per_node(self) -> int:
        return self.G // self.num_nodes

    @property
    def slots_per_rank(self) -> int:
        return self.S + self.R

    @property
    def max_copies(self) -> int:
        """Upper bound on copies of one expert: one per rank of its node."""
        return self.ranks_per_node

    def node_ranks(self) -> np.ndarray:
        """[N, g] EP ranks of each node, ascending."""
        nodes = np.asarray(self.node_of_rank)
        return np.stack([np.flatnonzero(nodes == n) for n in range(self.num_nodes)])


def identity_placement(topo: Topology, num_layers: int) -> np.ndarray:
    """Megatron's placement: expert e in home slot e (rank e // S). Returns [L, E] expert per home slot."""
    return np.tile(np.arange(topo.E, dtype=np.int64), (num_layers, 1))


def check_node_of_expert(node_of_expert, num_layers: int, num_experts: int, num_nodes: int,
                         name: str = "node_of_expert") -> np.ndarray:
    """An expert -> node assignment [L, E] as int64, or PlanError naming what is wrong: its shape, a node id
    outside [0, N), or a layer that does not put E / N experts on each node."""
    out = np.asarray(node_of_expert)
    L, E, N = num_layers, num_experts, num_nodes
    if out.shape != (L, E):
        raise PlanError(f"{name}'s shape {out.shape} is not [{L} MoE layers, {E} experts]")
    if out.dtype.kind not in "iu":
        raise PlanError(f"{name} must hold integer node ids, got dtype {out.dtype}")
    out = out.astype(np.int64)
    if out.size and (out.min() < 0 or out.max() >= N):
        raise PlanError(f"{name} holds node ids outside [0, {N})")
    per_node = (out[:, :, None] == np.arange(N)).sum(1)                  # [L, N]
    if (per_node != E // N).any():
        raise PlanError(f"{name} does not put {E // N} experts on each of {N} nodes in every layer")
    return out


def invert_placement(expert_at_home: np.ndarray) -> np.ndarray:
    """[L, E] expert of each home slot -> [L, E] home slot of each expert."""
    L, E = expert_at_home.shape
    home_of_expert = np.empty_like(expert_at_home)
    np.put_along_axis(home_of_expert, expert_at_home, np.broadcast_to(np.arange(E), (L, E)), axis=1)
    return home_of_expert


@dataclasses.dataclass
class BatchPlan:
    """Everything the runtime needs for one batch (all micro-batches, all MoE layers).

    expert_at_home:  [L, E]         logical expert in each home slot (home slot h is on rank h // S).
    replica_expert:  [M, L, G, R]   logical expert held by each replica slot, -1 when empty.
    replica_quota:   [M, L, G, R, G] pairs of each source rank (last axis) sent to that replica slot.
    moved_experts:   [L]            experts whose home changed relative to the previous placement.
    """

    topo: Topology
    expert_at_home: np.ndarray
    replica_expert: np.ndarray
    replica_quota: np.ndarray
    moved_experts: np.ndarray

    @property
    def num_micro_batches(self) -> int:
        return self.replica_expert.shape[0]

    def followed_by(self, rest: "BatchPlan") -> "BatchPlan":
        """This plan's micro-batches, then those of `rest` (the same topology and placement): a mini-batch
        planned in parts."""
        if rest.topo != self.topo or not np.array_equal(rest.expert_at_home, self.expert_at_home):
            raise PlanError("followed_by: the plans are for different topologies or placements")
        return BatchPlan(self.topo, self.expert_at_home, np.concatenate([self.replica_expert, rest.replica_expert]),
                         np.concatenate([self.replica_quota, rest.replica_quota]), self.moved_experts)

    @property
    def num_layers(self) -> int:
        return self.expert_at_home.shape[0]

    def home_of_expert(self) -> np.ndarray:
        """[L, E] home slot (0..E-1) of every logical expert."""
        return invert_placement(self.expert_at_home)

    def physical_home_slot(self) -> np.ndarray:
        """[L, E] physical slot (0..G*(S+R)-1) of every expert's home copy."""
        S, R = self.topo.S, self.topo.R
        home = self.home_of_expert()
        return (home // S) * (S + R) + home % S

    def copy_tables(self, micro_batch: int, layer: int, source_rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Dispatch tables of one source rank for one (micro-batch, layer).

        Returns copy_slot [E, C] (physical slot of copy c of e, -1 if absent; column 0 is home) and
        quota [E, C] (this source rank's pairs for copy c; column 0 is 0: the home takes whatever
        the replicas do not), with C = topo.max_copies. Replicas are numbered 1.. in (rank, slot) order.
        """
        t = self.topo
        C = t.max_copies
        copy_slot = np.full((t.E, C), -1, dtype=np.int64)
        quota = np.zeros((t.E, C), dtype=np.int64)
        copy_slot[:, 0] = self.physical_home_slot()[layer]
        nxt = np.ones(t.E, dtype=np.int64)
        rep = self.replica_expert[micro_batch, layer]
        q = self.replica_quota[micro_batch, layer, :, :, source_rank]
        for r in range(t.G):
            for k in range(t.R):
                e = rep[r, k]
                if e < 0:
                    continue
                c = nxt[e]
                copy_slot[e, c] = r * (t.S + t.R) + t.S + k
                quota[e, c] = q[r, k]
                nxt[e] += 1
        return copy_slot, quota

    def digest(self) -> str:
        """A hash of the plan's content: equal on every rank that computed the same plan (invariant 3)."""
        h = hashlib.sha256()
        h.update(repr((self.topo.E, self.topo.G, self.topo.R, self.topo.node_of_rank)).encode())
        for a in (self.expert_at_home, self.replica_expert, self.replica_quota):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()


def planning_dtype(counts: np.ndarray) -> type:
    """int32 where the counts (pair counts) fit, else int64."""
    return np.int32 if counts.size == 0 or counts.max() < 2**31 else np.int64


def planning_layout(counts: np.ndarray) -> np.ndarray:
    """Counts [M, L, G, E] as the verl trainer plans them: C-contiguous, int32 where they fit (pair counts:
    half the memory the compiled kernels stream), read-only. numba compiles per array type and layout: one
    layout, compiled once by the trainer's planning process's warm-up and loaded from numba's disk cache by
    the training process."""
    out = np.array(counts, dtype=planning_dtype(counts), order="C")
    out.setflags(write=False)
    return out
