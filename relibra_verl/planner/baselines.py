"""EPLB as a training baseline: which physical copy of each expert holds its optimizer state.

EPLB (relibra_verl.planner.eplb) gives each logical expert one or more physical slots and splits its tokens
evenly over them. In training, one copy per expert is its *home*: it holds the fp32 main parameters and Adam
state and receives the other copies' gradients; the others (*redundant* copies) hold bf16 weights only,
refreshed every step. A new EPLB placement therefore moves optimizer state only where an expert's home
changes, and the home is chosen to change as little as possible.

Placement encoding, [L, P] over P = G * (S + R) physical slots (slot p on rank p // (S + R)):
  e >= 0       the home copy of expert e
  -(e + 2)     a redundant copy of expert e
  -1           an empty slot (Megatron's layout leaves the R spare slots of each rank empty)
relibra_verl.sim.cost.migration_time reads it as is: only home slots (>= 0) carry and send state.
"""
from __future__ import annotations

import numpy as np

from relibra_verl.planner.types import Topology

EMPTY = -1


def megatron_physical(topo: Topology, num_layers: int) -> np.ndarray:
    """[L, P] Megatron's layout in EPLB's slot space: expert e home in slot (e // S) * (S + R) + e % S."""
    S, R = topo.S, topo.R
    row = np.full(topo.G * (S + R), EMPTY, dtype=np.int64)
    e = np.arange(topo.E)
    row[(e // S) * (S + R) + e % S] = e
    return np.tile(row, (num_layers, 1))


def physical_to_logical(placement: np.ndarray) -> np.ndarray:
    """[L, P] encoded placement -> the expert in each slot (-1 empty), home or redundant alike."""
    p = np.asarray(placement)
    return np.where(p >= 0, p, np.where(p <= -2, -p - 2, EMPTY))


def choose_homes(phy2log: np.ndarray, topo: Topology, prev: np.ndarray | None = None) -> np.ndarray:
    """The encoded placement of EPLB's phy2log [L, P] (every slot filled), each expert's home chosen to move
    its optimizer state least: the slot that was its home (no move), else a copy on its previous home's
    rank, else on that node (NVLink), else its first copy. prev: the previous encoded placement [L, P]
    (None or another shape: Megatron's layout). Returns [L, P]."""
    phy2log = np.asarray(phy2log, dtype=np.int64)
    L, P = phy2log.shape
    if prev is None or np.shape(prev) != (L, P):
        prev = megatron_physical(topo, L)
    per = P // topo.G
    node = np.asarray(topo.node_of_rank)
    prev_home = np.full((L, topo.E), -1, dtype=np.int64)                 # [L, E] slot of each expert's home
    l_i, p_i = np.nonzero(prev >= 0)
    prev_home[l_i, prev[l_i, p_i]] = p_i
    slot = np.arange(P)
    old = np.take_along_axis(prev_home, phy2log, axis=1)                 # [L, P] previous home of the slot's expert
    known = old >= 0
    old_rank = np.where(known, old, 0) // per
    score = np.where(~known, 3, np.where(old == slot, 0, np.where(old_rank == slot // per, 1,
                     np.where(node[old_rank] == node[slot // per], 2, 3))))
    key = score * P + slot                                               # lowest score, then lowest slot
    best = np.full((L, topo.E), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, (np.repeat(np.arange(L), P), phy2log.reshape(-1)), key.reshape(-1))
    home_slot = best % P                                                 # [L, E]
    out = -phy2log - 2
    np.put_along_axis(out, home_slot, np.broadcast_to(np.arange(topo.E), (L, topo.E)), axis=1)
    return out


def redundant_per_rank(placement: np.ndarray, topo: Topology) -> np.ndarray:
    """[L, G] redundant copies each rank holds (slots encoded <= -2)."""
    L, P = np.shape(placement)
    return (np.asarray(placement) <= -2).reshape(L, topo.G, P // topo.G).sum(-1)


def moved_homes(prev: np.ndarray | None, placement: np.ndarray, topo: Topology) -> np.ndarray:
    """[L] home slots whose expert changed (each receives an expert's optimizer state)."""
    placement = np.asarray(placement)
    if prev is None or np.shape(prev) != placement.shape:
        prev = megatron_physical(topo, placement.shape[0])
    return ((placement != prev) & (placement >= 0)).sum(1)
