"""The trainer's planner warm-up compiles what the trainer's first real plans need: after it, planning a
time-aware, two-node batch in the trainer's layouts (and with the driver's hint) compiles nothing new; the
counts reach the planning process through shared memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

# what a check script counts: the signatures numba has compiled (or loaded from its cache) for each kernel
SIGNATURES = r"""
import json
import numba, numpy as np
from relibra_verl.planner import reorder, reorder_kernels, replicate

def signatures():
    return {f"{mod.__name__}.{name}": len(obj.signatures) for mod in (reorder, reorder_kernels, replicate)
            for name, obj in vars(mod).items() if isinstance(obj, numba.core.registry.CPUDispatcher)}
"""

CHECK = SIGNATURES + r"""
from relibra_verl.integration import trainer as tr
from relibra_verl.planner import ExpertShape, Topology, load_profile, planner_configs

tr._warm_up()
before = signatures()
topo = Topology(num_experts=16, ep_size=8, gpus_per_node=4, replica_slots=1)
rng = np.random.default_rng(1)
gathered = rng.integers(0, 300, size=(topo.G, 3, 4, topo.E + 1))
counts = gathered[..., :topo.E].transpose(1, 2, 0, 3)
placement = np.tile(np.arange(topo.E, dtype=np.int64), (4, 1))
hint = np.tile(np.arange(topo.E, dtype=np.int64) // (topo.E // 2), (4, 1))
replication, reorder_cfg = planner_configs(ExpertShape(4096, 1536), load_profile("h100-ib400"), 2, 4,
                                           reorder_inter_node_share=0.85)
# the training process plans the first micro-batch on planning_layout, the planning process the rest on
# what _SharedArray hands over
tr._plan_rest(tr.planning_layout(counts[:2]), topo, placement, replication)
shared = tr._SharedArray(counts, tr.planning_dtype(counts))
try:
    tr._plan_next_placement(shared.read(), topo, placement, replication, reorder_cfg, hint)
    tr._plan_next_placement(shared.read(), topo, placement, replication, reorder_cfg)
    tr._plan_rest(shared.read(), topo, placement, replication)
finally:
    shared.remove()
after = signatures()
print(json.dumps({"compiled": sum(before.values()),
                  "new": {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}}))
"""


def test_warm_up_leaves_nothing_to_compile_for_the_first_plan():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["compiled"] > 0                       # the warm-up did compile (or load) the planner's loops
    assert result["new"] == {}, f"compiled after the warm-up: {result['new']}"


def _echo(counts):
    return np.array(counts), counts.dtype.name, counts.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("big", [False, True])
def test_counts_reach_the_planning_process_through_shared_memory_and_are_removed(big):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from relibra_verl.integration import trainer as tr

    rng = np.random.default_rng(2)
    gathered = rng.integers(0, 2**40 if big else 500, size=(4, 3, 2, 9))
    counts = gathered[..., :8].transpose(1, 2, 0, 3)                   # [M, L, G, E], not contiguous
    made = []
    real = tr._SharedArray.__init__

    def spy(self, c, dtype=None):
        real(self, c, dtype)
        made.append(self.path)

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        tr._SharedArray.__init__ = spy
        try:
            job = tr._submit(_echo, counts, pool=pool)
            got, dtype, contiguous = job.result()
        finally:
            tr._SharedArray.__init__ = real
    np.testing.assert_array_equal(got, counts)
    assert dtype == ("int64" if big else "int32") and contiguous
    assert len(made) == 1 and not os.path.exists(made[0])              # removed once the job is done


def _big_plan(seed, shape):
    """(a plan-like result with a large and a small array, a number), as _plan_rest returns."""
    from relibra_verl.planner import BatchPlan, Topology

    rng = np.random.default_rng(seed)
    topo = Topology(num_experts=8, ep_size=4, gpus_per_node=2, replica_slots=2)
    quota = rng.integers(0, 1000, size=shape, dtype=np.int32)
    plan = BatchPlan(topo, np.tile(np.arange(8), (shape[1], 1)), rng.integers(-1, 8, size=shape[:4]), quota,
                     np.zeros(shape[1], dtype=np.int64))
    return plan, 1.5


def _fail(counts):
    raise ValueError("planning failed on purpose")


def test_plans_come_back_through_shared_memory_mapped_and_removed():
    """A plan's large arrays return through /dev/shm files: equal to what the job computed, writeable
    without reaching the file, and no file left behind, also for a job whose result nobody asks for; a
    job's error still reaches result()."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from relibra_verl.integration import trainer as tr

    shape = (3, 4, 4, 2, 4 * 512)                                      # quotas of 196 KB: shared
    counts = np.ones((1, 1, 4, 8), dtype=np.int64)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = tr._submit(_ignore_counts_plan, counts, 7, shape, pool=pool)
        forgotten = tr._submit(_ignore_counts_plan, counts, 8, shape, pool=pool)
        failing = tr._submit(_fail, counts, pool=pool)
        plan, ms = job.result()
        with pytest.raises(ValueError, match="on purpose"):
            failing.result()
        raw = forgotten._future.result()                               # as it arrived, before mapping
        deadline = time.monotonic() + 60
        while not forgotten._resolved and time.monotonic() < deadline:  # its done callback maps it
            time.sleep(0.01)
        assert forgotten._resolved
    want, want_ms = _big_plan(7, shape)
    sent = job._future.result()[0]
    assert ms == want_ms and isinstance(sent.replica_quota, tr._SharedArray)
    assert not isinstance(sent.expert_at_home, tr._SharedArray)        # small arrays are pickled
    np.testing.assert_array_equal(plan.replica_quota, want.replica_quota)
    np.testing.assert_array_equal(plan.replica_expert, want.replica_expert)
    np.testing.assert_array_equal(plan.expert_at_home, want.expert_at_home)
    assert isinstance(plan.replica_quota, np.ndarray) and plan.replica_quota.flags.writeable
    plan.replica_quota[0, 0, 0, 0, 0] += 1                             # copy-on-write: private to this array
    assert plan.replica_quota[0, 0, 0, 0, 0] == want.replica_quota[0, 0, 0, 0, 0] + 1
    for handle in (sent.replica_quota, raw[0].replica_quota):
        assert not os.path.exists(handle.path)                         # removed once mapped
    np.testing.assert_array_equal(forgotten.result()[0].replica_quota, _big_plan(8, shape)[0].replica_quota)


def _ignore_counts_plan(counts, seed, shape):
    return _big_plan(seed, shape)


def _full(dirs_full):
    """A posix_fallocate that finds no room in the directories dirs_full (as a full tmpfs answers)."""
    import errno

    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if any(path.startswith(d.rstrip("/") + "/") for d in dirs_full):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    return fallocate


def test_shared_arrays_fall_back_to_the_temp_dir_then_to_pickling_when_shared_memory_is_full(monkeypatch, tmp_path):
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from relibra_verl.integration import trainer as tr

    shm, spare = tmp_path / "shm", tmp_path / "spare"
    shm.mkdir()
    spare.mkdir()
    monkeypatch.setattr(tr, "_shared_dirs", lambda: [str(shm), str(spare)])
    counts = np.arange(2 * 3 * 4 * 8, dtype=np.int64).reshape(2, 3, 4, 8)
    # shared memory full: the file goes to the next directory, room reserved, contents equal
    monkeypatch.setattr(tr.os, "posix_fallocate", _full([str(shm)]))
    shared = tr._SharedArray(counts, np.int32)
    try:
        assert os.path.dirname(shared.path) == str(spare) and not os.listdir(shm)
        np.testing.assert_array_equal(shared.read(), counts)
    finally:
        shared.remove()
    # no room anywhere: an error naming it; a result's array stays in the result (pickled); the counts go
    # to the planning process pickled and the job still computes on them
    monkeypatch.setattr(tr.os, "posix_fallocate", _full([str(shm), str(spare)]))
    with pytest.raises(OSError, match="no room for 768 bytes of planning data"):
        tr._SharedArray(counts, np.int32)
    assert tr._share((counts, 1.5), 1)[0] is counts
    assert not os.listdir(shm) and not os.listdir(spare)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got, dtype, contiguous = tr._submit(_echo, counts, pool=pool).result()
    np.testing.assert_array_equal(got, counts)
    assert dtype == "int32" and contiguous


SIMULATE_CHECK = SIGNATURES + r"""
from relibra_verl.commands import simulate as sim
from relibra_verl.planner import ExpertShape, ReorderConfig, ReplicationConfig, Topology, load_profile, planner_configs

topo = Topology(num_experts=16, ep_size=8, gpus_per_node=4, replica_slots=2)
rng = np.random.default_rng(2)
counts = rng.integers(0, 300, size=(2, 3, 4, topo.G, topo.E)) * (rng.random((2, 3, 4, 1, topo.E)) < 0.6)
hint = np.tile(np.arange(topo.E) // (topo.E // topo.num_nodes), (4, 1))
names = sim._COMPILED_STRATEGIES
configs = [(ReplicationConfig(), ReorderConfig()),
           planner_configs(ExpertShape(4096, 1536), load_profile("h100-ib400"), 2, 4, reorder_inter_node_share=0.85)]
for replication, reorder_cfg in configs:
    for name in names:
        sim._compile_planner(name, counts[0], topo, replication, reorder_cfg)
before = signatures()
sim._compile_planner = lambda *args: None          # what simulate times from here on
for replication, reorder_cfg in configs:
    sim.run_strategies(names, counts, [], topo, 1, replication, reorder=reorder_cfg,
                       place_data=lambda i, prev: (counts[i], hint, None))
after = signatures()
print(json.dumps({"compiled": sum(before.values()),
                  "new": {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}}))
"""


def test_simulate_compiles_the_planner_before_it_times_the_strategies():
    """simulate's plan ms is the planner's time, not numba's compile: every loop the timed plans call is
    compiled by _compile_planner first (both the default and the time-aware configurations)."""
    out = subprocess.run([sys.executable, "-c", SIMULATE_CHECK], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["compiled"] > 0
    assert result["new"] == {}, f"compiled while timed: {result['new']}"


def _ones(counts, shape):
    return np.ones(shape, np.int32)


def _in_dir(directory, fn, *args):
    """fn(*args) in the planning process, its shared files made in `directory`."""
    from relibra_verl.integration import trainer as tr

    tr._shared_dirs = lambda: [directory]
    return fn(*args)


def test_files_of_ended_training_processes_are_removed_when_planning_starts(monkeypatch, tmp_path):
    """A training process killed between making a shared file and removing it leaves the file in /dev/shm.
    The files are named by the training process that owns them (the planning process's parent) and its PID
    namespace; a new planning pool removes those of owners that have ended, in its own namespace only."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from relibra_verl.integration import trainer as tr

    monkeypatch.setattr(tr, "_shared_dirs", lambda: [str(tmp_path)])
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        made_there = pool.submit(_in_dir, str(tmp_path), tr._with_shared_counts, _ones, np.zeros(1), 0, os.getpid(),
                                 (4, 4)).result().path
    made_here = tr._SharedArray(np.ones(8)).path
    for path in (made_there, made_here):            # both owned by this (the training) process
        assert os.path.dirname(path) == str(tmp_path)
        assert os.path.basename(path).startswith(tr._shared_prefix(os.getpid()))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = int(ended.stdout)
    stale = [tmp_path / f"{tr._shared_prefix(dead)}abc{i}" for i in range(2)]
    for i, path in enumerate(stale):
        path.write_bytes(b"\0" * (100 + i))
    other_namespace = tmp_path / f"relibra-1-{dead}-abc"           # another container's: not ours to judge
    unrelated = tmp_path / f"relibra-{tr._pid_namespace()}-notapid-x"
    for path in (other_namespace, unrelated):
        path.write_bytes(b"\0")
    assert tr._remove_stale_shared_files() == (2, 201)
    left = set(os.listdir(tmp_path))
    assert left == {os.path.basename(made_there), os.path.basename(made_here), other_namespace.name, unrelated.name}
    # the trainer's pool does it when it starts, and says so
    monkeypatch.setattr(tr, "_planner_pool", None)
    stale[0].write_bytes(b"\0" * 10)
    messages = []
    monkeypatch.setattr(tr.logger, "warning", lambda msg, *a: messages.append(msg))
    try:
        tr._planner()
    finally:
        tr._planner_pool.shutdown()
        monkeypatch.setattr(tr, "_planner_pool", None)
    assert not stale[0].exists() and len(messages) == 1 and "removed 1 planning file(s)" in messages[0]
    for path in (made_there, made_here):
        os.unlink(path)
