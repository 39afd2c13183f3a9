"""The DeepSeek EPLB algorithm (github deepseek-ai/EPLB), re-implemented in numpy as a baseline.

Terms: a *logical* expert is a model expert; a *physical* expert is one copy of it in a GPU slot.
`phy2log[l, p]` names the logical expert in physical slot p (slot p lives on GPU p // slots_per_gpu);
`logcnt[l, e]` is how many copies expert e has. EPLB splits an expert's tokens evenly over its copies.

Hierarchical (expert groups divisible by nodes): 1. pack expert groups onto nodes, 2. replicate inside
each node, 3. pack the node's physical experts onto its GPUs. Global otherwise: one group, one node.
"""
from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into num_packs packs of n / num_packs items each, heaviest item first into the
    lightest pack that still has room.

    weight: [X, n].  Returns pack_index [X, n] and rank_in_pack [X, n].
    """
    X, n = weight.shape
    per_pack = n // num_packs
    assert per_pack * num_packs == n, "items must divide evenly into packs"
    pack_index = np.empty((X, n), dtype=np.int64)
    rank_in_pack = np.empty((X, n), dtype=np.int64)
    if per_pack == 1:
        pack_index[:] = np.arange(n)
        rank_in_pack[:] = 0
        return pack_index, rank_in_pack
    for x in range(X):
        pack_weight = np.zeros(num_packs, dtype=np.float64)
        pack_items = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[x], kind="stable"):
            room = pack_items < per_pack
            candidates = np.flatnonzero(room)
            p = candidates[np.argmin(pack_weight[candidates])]
            pack_index[x, item] = p
            rank_in_pack[x, item] = pack_items[p]
            pack_weight[p] += weight[x, item]
            pack_items[p] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add num_phy - n redundant copies, each to the expert with the highest load per copy.

    weight: [X, n].  Returns phy2log [X, num_phy], phy_rank [X, num_phy] (copy number), logcnt [X, n].
    """
    X, n = weight.shape
    assert num_phy >= n
    phy2log = np.empty((X, num_phy), dtype=np.int64)
    phy_rank = np.zeros((X, num_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    logcnt = np.ones((X, n), dtype=np.int64)
    rows = np.arange(X)
    for p in range(n, num_phy):
        hottest = np.argmax(weight / logcnt, axis=1)
        phy2log[:, p] = hottest
        phy_rank[:, p] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, phy_rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations [X, n]."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical EPLB.

    weight: [L, E] load per logical expert.  Returns phy2log [L, num_phy] and logcnt [L, E].
    """
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_node = num_phy // num_nodes
    log_per_node = E // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. expert groups -> nodes; mlog ("meta-logical") numbers experts node by node
    group_load = weight.reshape(L, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    log2mlog = log2mlog.reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * num_nodes, log_per_node)
    phy2mlog, _, mlogcnt = replicate_experts(mlog_load, phy_per_node)

    # 3. physical experts -> GPUs of the node, by load per copy
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    gpu_pack, gpu_rank = balanced_packing(phy_load, gpus_per_node)
    pphy2phy = gpu_pack * phy_per_gpu + gpu_rank
    pphy2mlog = np.take_along_axis(phy2mlog, _inverse(pphy2phy), axis=1)
    node_base = (np.arange(num_nodes) * log_per_node)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, phy_per_node) + node_base).reshape(L, num_phy)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, E), log2mlog, axis=1)
    return phy2log, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB entry point: hierarchical when groups divide evenly over nodes, global otherwise.

    weight: [L, E].  Returns phy2log [L, num_replicas], log2phy [L, E, max_copies] (-1 padded), logcnt [L, E].
    """
    weight = np.asarray(weight, dtype=np.float64)
    L, E = weight.shape
    if num_groups % num_nodes == 0 and E % num_groups == 0:
        phy2log, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_copies = num_replicas - E + 1
    log2phy = np.full((L, E, max_copies), -1, dtype=np.int64)
    seen = np.zeros((L, E), dtype=np.int64)
    for l in range(L):
        for p, e in enumerate(phy2log[l]):
            log2phy[l, e, seen[l, e]] = p
            seen[l, e] += 1
    return phy2log, log2phy, logcnt
