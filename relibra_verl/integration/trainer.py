"""relibra in verl's Megatron engines: loads -> one all-gather -> plan -> layers, per pass and mini-batch.

One `RelibraTrainer` lives on the actor's `MegatronEngine` (`engine._relibra`, role "actor") and one on the
reference model's engine (role "ref", no optimizer). A GRPO step runs three passes over the batch, each a
`forward_backward_batch` call with its own micro-batch split:

  logprob   the actor's old-log-prob forward (forward_only, routes replayed by R3). Before its first
            forward the batch's placement is planned from the whole batch's routes and applied (weights,
            fp32 main params and optimizer state), so the migration is paid once and all passes run on it
  ref       the reference model's forward. verl does not replay routes there (the ref routes live), so
            its replicas are planned from the batch's replayed routes as a prediction; the slot assignment
            sends any pair beyond a replica's quota home, so the output is exact whatever the ref routes.
            Its placement is reordered with weights only (no optimizer state), where the cost model says
            the move pays. With LoRA verl computes it on the actor without adapter (a forward-only call on
            the actor inside `disable_adapter`): planned like logprob, on the actor's placement
  update    the actor's mini-batches (forward and backward)

Forward-only passes fetch replica weights only (no backward: no gradient return, no refetch) and plan with
a forward-only cost model (no backward GEMMs, no gradient bytes). Their metrics (`relibra/logprob/*`,
`relibra/ref/*`) are kept until the update's first mini-batch reports them with its own (`relibra/*`):
verl reads no metrics from its log-prob calls.

The verl patches (relibra_verl/patches/verl_engine.py) call, per mini-batch:

  begin(engine, data, forward_only)     in forward_backward_batch, before verl splits the mini-batch
  on_micro_batches(micro_batches)       right after verl's prepare_micro_batches: counts of every
                                        micro-batch (routes replayed by R3 only), all-gathered over EP
                                        once, planned (lead's planner), plan installed in the runtime;
                                        each micro-batch is tagged with its index
  on_forward(batch, output)             in forward_step: select the micro-batch's plan before its
                                        forward, and again when its backward starts (PP / recompute)
  finish(output)                        metrics into verl's metrics dict
  after_optimizer_step(engine)          apply the next placement (reordering) via the runtime

Only the first micro-batch's replicas, needed before its forward, are planned on the critical path
(`relibra/plan_ms`). The other micro-batches' replicas (installed before micro-batch 1's forward) and the
next placement (needed only after the optimizer step; weighed with its replicas and migration against
keeping the current one) are planned beside the mini-batch's forward and backward,
in a separate planning process, so that the training thread keeps its pace
(`relibra-verl bench-planner --contention`).

Without routes (R3 off, or a micro-batch without `routed_experts`) the mini-batch runs Megatron's plain
dispatch, a warning is logged once and `relibra/fallbacks` counts the micro-batches; with
`on_missing_routing=error` it raises instead.
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

from relibra_verl.config import RelibraConfig
from relibra_verl.integration import runtime_bridge as rb
from relibra_verl.integration.data_placement import HINT_KEY
from relibra_verl.integration.microbatch import ParallelStateError, micro_batch_loads
from relibra_verl.integration.routes import RoutesError, moe_layers_of
from relibra_verl.planner import (BatchPlan, PlanError, ReorderConfig, ReplicationConfig, Topology, plan_outcome,
                                  plan_relibra, planner_configs)
from relibra_verl.planner.types import check_node_of_expert, planning_dtype, planning_layout

logger = logging.getLogger("relibra_verl")

MB_KEY = "relibra_micro_batch"  # non-tensor tag verl carries on each micro-batch
_active: contextvars.ContextVar = contextvars.ContextVar("relibra_active", default=None)
PASSES = ("update", "logprob", "ref")
# metrics of the forward-only passes of this process (actor and ref engine alike), reported by the next
# update's first mini-batch
_pending_pass_metrics: dict[str, float] = {}


class RelibraError(RuntimeError):
    """relibra cannot run this mini-batch and the user asked for strict mode."""


_planner_pool: ProcessPoolExecutor | ThreadPoolExecutor | None = None


def _planner() -> ProcessPoolExecutor | ThreadPoolExecutor:
    """One planning process per training process for the plans not needed at once, in submission order:
    the replicas of a mini-batch's later micro-batches, then the next placement. A process, not a thread:
    the planner's loops are compiled and release the GIL, but its numpy glue holds it, and a thread beside
    the training thread slowed a launch-bound loop more than a process did, in the same run
    (bench-planner --contention). Spawned (no fork of a process holding CUDA or NCCL state); the loads go
    to it, and the plans' large arrays come back, through shared memory (_submit); files that ended
    training processes left there are removed first."""
    global _planner_pool
    if _planner_pool is None:
        if multiprocessing.current_process().daemon:
            # a daemonic process (a multiprocessing launcher's rank) may not start children: plan in a thread,
            # where the compiled loops still release the GIL
            logger.warning("relibra-verl: this process is daemonic and cannot start a planning process; "
                           "planning in a background thread instead")
            _planner_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relibra-planner")
        else:
            files, size = _remove_stale_shared_files()
            if files:
                logger.warning(f"relibra-verl: removed {files} planning file(s) ({size / 2**20:.1f} MiB) left in "
                               f"{' and '.join(_shared_dirs())} by training processes that have ended")
            _planner_pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _planner_pool


def _pid_namespace() -> str:
    """This process's PID namespace (its inode), or "" where /proc does not tell: the files of
    _SharedArray are named by their owner's PID, which means something only inside one namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _shared_prefix(owner: int) -> str:
    """The name's start of every file _SharedArray makes for the training process `owner` (the one that
    removes it): relibra-<PID namespace>-<owner PID>-."""
    return f"relibra-{_pid_namespace() or 'x'}-{owner}-"


def _remove_stale_shared_files() -> tuple[int, int]:
    """Remove the files _SharedArray made for training processes of this PID namespace that have ended
    (killed between making a file and removing it: by Ray, the OOM killer, a crash). Left there, they hold
    /dev/shm, which NCCL and the data loaders need too, until the machine restarts. Returns (files, bytes)
    removed. A file of another namespace, or of an owner that is alive, is left alone."""
    namespace = _pid_namespace()
    if not namespace:
        return 0, 0
    start = f"relibra-{namespace}-"
    files = size = 0
    for directory in _shared_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            owner = name[len(start):].split("-", 1)[0] if name.startswith(start) else ""
            if not owner.isdigit() or _alive(int(owner)):
                continue
            path = os.path.join(directory, name)
            try:
                nbytes = os.stat(path).st_size
                os.unlink(path)
            except OSError:
                continue
            files, size = files + 1, size + nbytes
    return files, size


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists in this PID namespace (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # exists, owned by another user
        return True
    return True


def _shared_dirs() -> list[str]:
    """Where _SharedArray puts its files, in order: shared memory, then the temporary directory (a file in
    the page cache: where /dev/shm is small, as Docker's 64 MB default)."""
    return [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]


class _SharedArray:
    """An array handed between the training process and the planning process through a file in shared
    memory (/dev/shm): written with numpy (which releases the GIL) on one side, mapped on the other. Pickled,
    the training process would hold the GIL for it: about 16 ms to pickle a Qwen3-30B-A3B mini-batch's 25 MB
    of counts on a CPU core, and for a plan coming back, the executor's result thread reads the pipe and
    unpickles it in many short turns of the GIL beside the training thread (bench-planner --contention).
    dtype: what to store (counts go as int32 where they fit: they are pair counts, and it halves the copy).
    owner: the PID of the training process that removes the file (None: this process).

    The file's room is reserved first (posix_fallocate): writing a mapped tmpfs file beyond the room left
    would kill the process (SIGBUS), and the ranks of a node share /dev/shm. Where /dev/shm has no room the
    temporary directory is used; where neither has, OSError (the caller pickles instead). The file is named
    for the training process that removes it (_shared_prefix), so that a new planning pool can remove what
    a killed one left (_remove_stale_shared_files)."""

    def __init__(self, array: np.ndarray, dtype=None, owner: int | None = None):
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype if dtype is None else dtype).name
        nbytes = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
        errors = []
        for directory in _shared_dirs():
            fd, self.path = tempfile.mkstemp(prefix=_shared_prefix(owner or os.getpid()), dir=directory)
            try:
                if nbytes:
                    os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:
                errors.append(f"{directory}: {exc}")
                os.close(fd)
                self.remove()
                continue
            os.close(fd)
            break
        else:
            raise OSError(f"no room for {nbytes} bytes of planning data ({'; '.join(errors) or 'no directory'})")
        if nbytes:
            out = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=self.shape)
            np.copyto(out, array, casting="unsafe")
            del out

    def read(self, writeable: bool = False) -> np.ndarray:
        """The array, mapped (no copy): read-only, or writeable with copy-on-write pages (private: a write
        never reaches the file)."""
        if not np.prod(self.shape):
            out = np.zeros(self.shape, dtype=self.dtype)
            out.flags.writeable = writeable
            return out
        return np.asarray(np.memmap(self.path, dtype=self.dtype, mode="c" if writeable else "r", shape=self.shape))

    def remove(self, _future=None) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# a planning job's result arrays at least this large come back through shared memory (a plan's quotas)
_SHARED_RESULT_BYTES = 1 << 16


def _map_arrays(value, leaf):
    """value with leaf(x) in place of every x that is not a tuple or a dataclass (such as BatchPlan), inside
    tuples and dataclasses: how a planning job's result is shared and unshared."""
    if isinstance(value, tuple):
        return tuple(_map_arrays(v, leaf) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_arrays(getattr(value, f.name), leaf)
                                             for f in dataclasses.fields(value) if f.init})
    return leaf(value)


def _share(value, min_bytes: int, owner: int | None = None):
    """A planning job's result with its arrays of at least min_bytes put in shared memory (_SharedArray);
    undone by _unshare in the training process."""
    def leaf(x):
        if isinstance(x, np.ndarray) and x.nbytes >= min_bytes:
            try:
                return _SharedArray(x, owner=owner)
            except OSError:   # no room in shared memory nor in the temporary directory: pickled
                pass
        return x

    return _map_arrays(value, leaf)


def _unshare(value):
    """_share undone: each shared array mapped (writeable, copy-on-write) and its file removed."""
    def leaf(x):
        if not isinstance(x, _SharedArray):
            return x
        try:
            return x.read(writeable=True)
        finally:
            x.remove()

    return _map_arrays(value, leaf)


class _PlanningJob:
    """A job of the planning process: its result with the shared arrays mapped back (_unshare), as soon as
    it arrives (in the executor's result thread: a few system calls, no copy), so that no file outlives a
    job whose result nobody asks for. result() and done() as a Future's."""

    def __init__(self, future: Future):
        self._future = future
        self._lock = threading.Lock()
        self._value, self._resolved = None, False
        future.add_done_callback(self._resolve_quietly)

    def _resolve(self):
        with self._lock:
            if not self._resolved:
                self._value, self._resolved = _unshare(self._future.result()), True
            return self._value

    def _resolve_quietly(self, _future) -> None:
        try:
            self._resolve()
        except BaseException:   # the job's error: raised by result()
            pass

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None):
        self._future.result(timeout)
        return self._resolve()


def _submit(fn, counts: np.ndarray, *args, pool=None) -> "Future | _PlanningJob":
    """fn(counts, *args) in the planning pool (None: _planner()). In a process, the counts go through
    shared memory (_SharedArray, removed when the job is done) and so do the result's large arrays
    (_PlanningJob); in a thread, a copy of the counts in planning_layout."""
    pool = _planner() if pool is None else pool
    if isinstance(pool, ThreadPoolExecutor):
        return pool.submit(fn, planning_layout(counts), *args)
    try:
        shared = _SharedArray(counts, planning_dtype(counts))
    except OSError as exc:
        rb._warn_once("shared-counts", f"the loads go to the planning process pickled: {exc}")
        return _PlanningJob(pool.submit(_with_shared_counts, fn, planning_layout(counts), _SHARED_RESULT_BYTES,
                                        os.getpid(), *args))
    try:
        job = pool.submit(_with_shared_counts, fn, shared, _SHARED_RESULT_BYTES, os.getpid(), *args)
    except BaseException:
        shared.remove()
        raise
    job.add_done_callback(shared.remove)
    return _PlanningJob(job)


def _with_shared_counts(fn, shared: "_SharedArray | np.ndarray", min_bytes: int, owner: int, *args):
    """In the planning process: fn on the shared counts (read-only, C-contiguous: planning_layout; or the
    counts themselves, pickled), its result's arrays of at least min_bytes shared back, their files named
    for the training process `owner`, which removes them."""
    counts = shared.read() if isinstance(shared, _SharedArray) else shared
    return _share(fn(counts, *args), min_bytes, owner)


def _plan_rest(counts: np.ndarray, topo: Topology, placement: np.ndarray, replication: ReplicationConfig):
    """The background part of a mini-batch's replicas: micro-batches 1.. (their plan, its wall time in ms)."""
    return _timed(plan_relibra, counts[1:], topo, placement, mode="replicate", replication=replication)


def _plan_next_placement(counts: np.ndarray, topo: Topology, placement: np.ndarray, replication: ReplicationConfig,
                         reorder: ReorderConfig, preferred_node: np.ndarray | None = None) -> np.ndarray:
    """The placement for the next mini-batch: the reorder weighed with its replicas and migration against
    keeping the current placement (plan_relibra, mode both), packed towards the driver's expert nodes
    preferred_node [L, E] where given. Returns expert_at_home [L, E]."""
    mode = "both" if topo.R > 0 else "reorder"
    return plan_relibra(counts, topo, placement, mode=mode, replication=replication, reorder=reorder,
                        preferred_node=preferred_node, with_replicas=False).expert_at_home


def _warm_up() -> None:
    """Compile the planner's loops in the planning process (numba; tens of seconds cold on a busy host,
    about 2 s from numba's disk cache): started when relibra attaches, so that the placement planned before
    the first log-prob pass does not wait for the compiler. numba compiles per argument type and array
    layout, so this plans what the trainer plans: two nodes, counts in planning_layout, the default
    configurations and the time-aware ones (float costs, NIC share), with and without the driver's hint."""
    from relibra_verl.planner import ExpertShape, load_profile

    topo = Topology(num_experts=8, ep_size=4, gpus_per_node=2, replica_slots=2)
    M, L, G, E = 2, 2, topo.G, topo.E
    rng = np.random.default_rng(0)
    gathered = rng.integers(0, 40, size=(G, M, L, E + 1)) * (np.arange(E + 1) < 3)
    counts = planning_layout(gathered[..., :E].transpose(1, 2, 0, 3))      # [M, L, G, E]
    placement = np.tile(np.arange(E, dtype=np.int64), (L, 1))
    hint = np.tile(np.arange(E, dtype=np.int64) % topo.num_nodes, (L, 1))
    timed = planner_configs(ExpertShape(2048, 768), load_profile("h100-ib400"), topo.num_nodes,
                            topo.ranks_per_node, reorder_inter_node_share=0.8)
    for replication, reorder in ((ReplicationConfig(), ReorderConfig()), timed):
        for preferred_node in (None, hint):
            _plan_next_placement(counts, topo, placement, replication, reorder, preferred_node)
        _plan_rest(counts, topo, placement, replication)


def _busy(seconds: float) -> int:
    """Compute for `seconds` without touching memory: the contention bench's control job."""
    end, spins = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        spins += 1
    return spins


def background_planning_contention(counts: np.ndarray, topo: Topology, replication: ReplicationConfig,
                                   reorder: ReorderConfig, rounds: int = 60, loop_iters: int = 2000) -> dict:
    """How much the trainer's background planning slows the training thread: a launch-bound loop of small
    torch ops (what a GPU training thread does between kernel launches) timed alone, while _planner() plans
    a mini-batch as on_micro_batches submits it (the later micro-batches' replicas, then the next
    placement), and while a thread of this process plans it (the compiled kernels release the GIL, the
    numpy glue does not). The control: the same process computing for as long as the planning took, on a
    few registers (_busy): what any busy core costs this one on this machine (shared caches, memory,
    hypervisor), which no planner design can go below. Each round's slowdown is against the loop alone
    just before it; medians over `rounds` rounds, the arms alternated. counts: [M, L, G, E]."""
    x = torch.zeros(64)

    def loop_us() -> float:
        t0 = time.perf_counter()
        y = x
        for _ in range(loop_iters):
            y = (y + 1.0) * 0.5
        return (time.perf_counter() - t0) * 1e6 / loop_iters

    def beside(jobs) -> list[float]:
        out = [loop_us()]
        while not jobs[-1].done():
            out.append(loop_us())
        for job in jobs:
            job.result()
        return out

    def planning(pool) -> list:
        return [_submit(_plan_rest, counts, topo, placement, replication, pool=pool),
                _submit(_plan_next_placement, counts, topo, placement, replication, reorder, pool=pool)]

    placement = np.tile(np.arange(topo.E, dtype=np.int64), (counts.shape[1], 1))
    process = _planner()
    _submit(_plan_rest, counts[:2], topo, placement, replication, pool=process).result()   # started, kernels loaded
    t0 = time.perf_counter()
    for job in planning(process):
        job.result()
    planning_s = time.perf_counter() - t0
    alone, in_process, in_thread, busy = [], [], [], []
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(_plan_rest, counts[:2], topo, placement, replication).result()
        loop_us()
        # paired rounds: each ratio against the loop alone just before it (the machine's load drifts)
        for _ in range(rounds):
            for jobs, ratios in ((lambda: planning(process), in_process), (lambda: planning(thread), in_thread),
                                 (lambda: [process.submit(_busy, planning_s)], busy)):
                base = loop_us()
                alone.append(base)
                ratios.append(float(np.median(beside(jobs()))) / base)
    a, p, t, c = (float(np.median(v)) for v in (alone, in_process, in_thread, busy))

    def quartiles(v):
        return [float(q) for q in np.percentile(v, [25, 75])]

    return {"training_loop_alone_us": a, "training_loop_beside_us": a * p, "training_thread_slowdown": p,
            "slowdown_quartiles": quartiles(in_process),
            "busy_process_slowdown": c, "busy_process_slowdown_quartiles": quartiles(busy),
            "thread_slowdown": t, "thread_slowdown_quartiles": quartiles(in_thread),
            "planner": "a separate process, as the trainer plans", "planning_ms": planning_s * 1e3,
            "slowdown_rounds": in_process, "busy_process_slowdown_rounds": busy,
            "training_loop_beside_thread_us": a * t, "thread_slowdown_rounds": in_thread}


def _timed(fn, *args, **kwargs):
    """(fn's result, its wall time in ms)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t0) * 1e3


def active() -> "RelibraTrainer | None":
    """The trainer of the forward_backward_batch now running in this thread, if any."""
    return _active.get()


def imbalance(rank_tokens: np.ndarray) -> float:
    """Mean over (micro-batch, layer) of max over ranks / mean over ranks. rank_tokens: [M, L, G]."""
    mean = rank_tokens.mean(-1)
    ratio = np.where(mean > 0, rank_tokens.max(-1) / np.where(mean > 0, mean, 1), 1.0)
    return float(ratio.mean()) if ratio.size else 1.0


class RelibraTrainer:
    """relibra's state on one actor engine (see the module docstring for the call order)."""

    def __init__(self, cfg: RelibraConfig, *, engine=None, role: str = "actor"):
        if role not in ("actor", "ref"):
            raise ValueError(f"role must be actor or ref, got {role!r}")
        self.cfg = cfg
        self.engine = engine
        self.role = role
        self.pass_name = "update"
        self.adapter_disabled = False   # inside the actor's disable_adapter(): verl's ref pass with LoRA
        self.passes_run = 0             # batches seen by the pass that places (logprob / ref): reorder_every's clock
        self._placed_by_logprob = False  # the batch's placement is applied at the log-prob pass
        self._deferred_placement: np.ndarray | None = None
        self.runtime = None
        self.topo: Topology | None = None
        self.moe_layers: np.ndarray | None = None
        self.num_layers: int | None = None
        self.ep_group = None
        self.ready = False
        self.disabled_reason: str | None = None
        self.plan: BatchPlan | None = None
        self._next_placement: np.ndarray | None = None
        self._next_future: Future | None = None                         # the next placement, being planned
        # the planner's configuration: pair counts until _setup makes it time-aware (profile)
        self.replication = ReplicationConfig()
        self.reorder = ReorderConfig(max_moves_per_layer=self._max_moves(), inter_node_share=float(self.cfg.inter_node_share))
        self.replication_fwd, self.reorder_fwd = self.replication, self.reorder  # forward-only passes
        self.optimizer_steps = 0
        self.fallbacks_total = 0
        self._mb: dict = {}
        self._metrics: dict[str, float] = {}
        self._moved_last = 0
        self._token = None
        self._node_hint = None
        if cfg.reorders:
            _planner().submit(_warm_up)   # compile the planner beside verl's start-up

    # ---- setup ------------------------------------------------------------------------------------
    def _setup(self, engine) -> None:
        """Topology and runtime from the built model (first mini-batch, after verl's model build)."""
        from megatron.core import parallel_state as mpu

        tf = engine.tf_config
        self.num_layers = int(tf.num_layers)
        self.moe_layers = moe_layers_of(tf)
        E = int(tf.num_moe_experts)
        self.ep_group = mpu.get_expert_model_parallel_group()
        G = mpu.get_expert_model_parallel_world_size()
        g = min(self.cfg.gpus_per_node, G)
        self.topo = Topology(num_experts=E, ep_size=G, gpus_per_node=g,
                             replica_slots=self.cfg.replica_slots if self.cfg.replicates else 0,
                             node_of_rank=self._node_layout(G, g))
        self.runtime = rb.build(engine.module, self.topo, self.cfg, self.ep_group)
        self._plan_for_time(tf)
        self.ready = True
        logger.warning("relibra-verl: engine ready: E=%d EP=%d nodes=%d R=%d mode=%s MoE layers=%d runtime=%s",
                       E, G, self.topo.num_nodes, self.topo.R, self.cfg.mode, len(self.moe_layers),
                       type(self.runtime).__name__ if self.runtime is not None else "none (plain dispatch)")

    def _max_moves(self) -> int | None:
        return None if self.cfg.max_moved_experts < 0 else self.cfg.max_moved_experts

    def _plan_for_time(self, tf) -> None:
        """Time-aware planner configuration from the cost model of `cfg.profile` and the model's expert shape."""
        if self.cfg.profile == "none":
            return
        from relibra_verl.planner import ExpertShape
        from relibra_verl.planner import load_profile

        ffn = getattr(tf, "moe_ffn_hidden_size", None) or tf.ffn_hidden_size
        shape, profile = ExpertShape(int(tf.hidden_size), int(ffn)), load_profile(self.cfg.profile)

        def configs(prof):
            return planner_configs(shape, prof, self.topo.num_nodes, self.topo.ranks_per_node,
                                   reorder_inter_node_share=float(self.cfg.inter_node_share),
                                   max_moves_per_layer=self._max_moves())

        self.replication, self.reorder = configs(profile)
        self.replication_fwd, self.reorder_fwd = configs(forward_only_profile(profile, weights_only=self.role == "ref"))
        logger.warning("relibra-verl: time-aware planning (%s, %s engine): %s; %s; forward-only: %s", self.cfg.profile,
                       self.role, self.replication, self.reorder, self.replication_fwd)

    def _node_layout(self, G: int, g: int):
        """node_of_rank from the EP ranks' host names when each host holds exactly g ranks, else r // g."""
        if G == 1 or not torch.distributed.is_initialized():
            return None
        hosts = [None] * G
        torch.distributed.all_gather_object(hosts, socket.gethostname(), group=self.ep_group)
        order = {h: i for i, h in enumerate(dict.fromkeys(hosts))}
        nodes = [order[h] for h in hosts]
        sizes = np.bincount(nodes)
        if (sizes == g).all():
            return tuple(nodes)
        return None

    # ---- per mini-batch -------------------------------------------------------------------------
    def begin(self, engine, data, forward_only: bool):
        self.engine = engine
        self._forward_only = forward_only
        self.pass_name = ("ref" if self.role == "ref" or (forward_only and self.adapter_disabled)
                          else "logprob" if forward_only else "update")
        self._placement_found = None   # [L, E] the placement before this pass applied one
        self._flag_error = None
        self._replay = bool(getattr(engine, "enable_routing_replay", False)) and self._data_flag(data)
        self._node_hint = _non_tensor(data, HINT_KEY)    # the driver's expert nodes (data_placement: locality)
        self._r3 = getattr(getattr(engine.engine_config, "router_replay", None), "mode", "disabled") == "R3"
        self._metrics = {}
        self.plan = None
        self._rest_future = None
        if getattr(engine.engine_config, "dynamic_context_parallel", False):
            # verl's DynamicCPScheduler splits this mini-batch without prepare_micro_batches: no plan
            self._fallback([None], "dynamic context parallel is not supported by relibra yet")
        self._token = _active.set(self)

    def end(self) -> None:
        self._rest_future = None      # a mini-batch that stopped early: its remaining replicas are dropped
        if self._token is not None:
            _active.reset(self._token)
            self._token = None

    def _data_flag(self, data) -> bool:
        """verl's per-call routing-replay flag; unreadable means no replay (a counted fallback, not a guess)."""
        try:
            from verl.utils import tensordict_utils as tu

            return bool(tu.get_non_tensor_data(data, key="enable_routing_replay", default=False))
        except Exception as exc:
            self._flag_error = f"cannot read verl's enable_routing_replay flag ({type(exc).__name__}: {exc})"
            return False

    def _fallback(self, micro_batches, reason: str) -> None:
        if self.cfg.strict:
            raise RelibraError(f"relibra: {reason} (actor_rollout_ref.relibra.on_missing_routing=error)")
        rb._warn_once(f"fallback:{reason}", f"{reason}; plain Megatron dispatch, counted in relibra/fallbacks")
        n = len(micro_batches)
        self.fallbacks_total += n
        self._metrics["relibra/fallbacks"] = float(n)
        self._metrics[f"relibra/fallbacks/{_reason_key(reason)}"] = float(n)
        self.plan = None
        if self.runtime is not None:
            rb.set_plan(self.runtime, None)

    def on_micro_batches(self, micro_batches) -> None:
        """Plan the mini-batch from verl's micro-batches (the list verl will run, in order)."""
        from verl.utils import tensordict_utils as tu

        engine = self.engine
        if not self.ready and self.disabled_reason is None:
            try:
                self._setup(engine)
            except Exception as exc:  # unsupported model/parallel config: native path, said once, loudly
                if self.cfg.strict:
                    raise
                self.disabled_reason = f"relibra disabled for this engine: {type(exc).__name__}: {exc}"
                self.runtime = None
                logger.error("relibra-verl: %s", self.disabled_reason)
        for m, mb in enumerate(micro_batches):
            tu.assign_non_tensor(mb, **{MB_KEY: m})
        if self.disabled_reason is not None:
            return self._fallback(micro_batches, self.disabled_reason)
        if self.runtime is None:
            return self._fallback(micro_batches, "relibra runtime unavailable: MoE layers keep Megatron's dispatch")
        if not getattr(self.cfg.passes, self.pass_name):
            return self._skip_pass()
        if self.role == "ref":
            pass  # the ref routes live: its loads are predicted from the batch's replayed routes (below)
        elif not self._r3 or not getattr(engine, "enable_routing_replay", False):
            return self._fallback(micro_batches, "routing replay R3 is off (actor.megatron.router_replay.mode "
                                                 "!= R3): loads are not known in advance")
        elif not self._replay:
            return self._fallback(micro_batches, self._flag_error
                                  or "this call does not replay routes (enable_routing_replay=False)")
        t0 = time.perf_counter()
        E, L = self.topo.E, len(self.moe_layers)
        local = np.zeros((len(micro_batches), L, E), dtype=np.int64)
        unknown = 0
        missing = 0
        error = None
        probe_error = None
        fp8 = getattr(engine.tf_config, "fp8", None) in ("e4m3", "hybrid")
        for m, mb in enumerate(micro_batches):
            if mb.get("routed_experts", None) is None:
                missing += 1
                continue
            try:
                local[m], unk = micro_batch_loads(mb, num_experts=E, moe_layers=self.moe_layers,
                                                  num_layers=self.num_layers, fp8_padding=fp8)
            except RoutesError as exc:
                error = RoutesError(f"relibra: micro-batch {m}: {exc}")
                break
            except ParallelStateError as exc:
                probe_error = str(exc)
                break
            unknown += int(unk.sum())
        # One all-gather per mini-batch. A rank's missing (-1) or malformed (-2) routes, or its unreadable
        # parallel state (-3), travel as a flag so that every rank takes the same decision (no rank may skip
        # a collective the others enter).
        code = -2 if error else -3 if probe_error else -1 if missing else 0
        flag = np.full((len(micro_batches), L, 1), code, dtype=np.int64)
        counts = self._all_gather(np.concatenate([local, flag], axis=2))   # [G, M, L, E+1]
        flags = counts[..., E].min(axis=(1, 2))                              # [G]
        if (flags == -2).any():
            if error is not None:
                raise error
            bad = np.flatnonzero(flags == -2).tolist()
            raise RoutesError(f"relibra: malformed routed_experts on EP ranks {bad}")
        if (flags == -3).any():
            bad = np.flatnonzero(flags == -3).tolist()
            detail = f"; here: {probe_error}" if probe_error else ""
            return self._fallback(micro_batches, f"cannot read Megatron's parallel sizes (EP ranks {bad}{detail})")
        if (flags < 0).any():
            bad = np.flatnonzero(flags < 0).tolist()
            return self._fallback(micro_batches, f"micro-batches without routed_experts on EP ranks {bad}")
        counts = counts[..., :E].transpose(1, 2, 0, 3)                      # [M, L, G, E]
        self._place_before_pass(counts)
        placement = rb.applied_placement(self.runtime, L, self.topo)
        M = len(micro_batches)
        replication = self.replication_fwd if self._forward_only else self.replication
        if self.cfg.replicates:
            # this mini-batch's replicas, on the placement the layers hold now: the first micro-batch's
            # before its forward, the others' in the background beside it (installed at micro-batch 1)
            plan = plan_relibra(planning_layout(counts[:1]), self.topo, placement, mode="replicate",
                                replication=replication)
            if M > 1:
                self._rest_future = _submit(_plan_rest, counts, self.topo, placement, replication)
        else:
            plan = _static_plan(self.topo, placement, M)
        if (self.cfg.reorders and not self._forward_only and self._reorder_due()
                and not self._placed_by_logprob):
            # no log-prob pass placed this batch (bypass mode, or passes.logprob off): the next placement
            # is planned from this mini-batch and applied after its optimizer step
            # every rank plans the same placement from the same gathered counts; a PlanError surfaces on
            # every rank alike when the placement is collected after the optimizer step
            self._next_placement = None
            self._next_future = _submit(_plan_next_placement, counts, self.topo, placement,
                                        self.replication, self.reorder, self._preferred_nodes(counts.shape[1]))
        plan_ms = ((time.perf_counter() - t0) * 1e3 - self._metrics.get("relibra/placement_ms", 0.0)
                   - self._metrics.get("relibra/placement_plan_ms", 0.0))
        rb.set_plan(self.runtime, plan)
        self.plan = plan
        self._counts, self._placement = counts, placement
        if self.cfg.metrics:
            self._metrics.update({"relibra/plan_ms": plan_ms, "relibra/plan_ms_background": 0.0,
                                  "relibra/unknown_pairs": float(unknown), "relibra/fallbacks": 0.0})
            if self._rest_future is None:
                self._plan_metrics()

    def _skip_pass(self) -> None:
        """This pass is switched off (actor_rollout_ref.relibra.passes): Megatron's dispatch over the applied
        placement (home slots only; exact), no relibra metrics."""
        self.plan = None
        rb.set_plan(self.runtime, None)

    def _place_before_pass(self, counts: np.ndarray) -> None:
        """The placement this batch runs on, applied before the pass's first forward.

        update: a placement deferred from the log-prob pass (optimizer state was offloaded there).
        logprob: planned from the whole batch's routes (counts of every micro-batch of the split), weighed
        with its replicas and migration against keeping the current one, and applied with the optimizer
        state (between optimizer steps: gradients are zero, nothing is in flight); the update's
        mini-batches then keep it. With optimizer offload the state is on the host during the log-prob
        call: the placement waits for the update's first mini-batch, and the log-prob pass runs on the
        previous placement with this batch's replicas.
        ref (own engine): the same with the ref's predicted loads and weights only (it has no optimizer),
        with the forward-only cost model deciding whether a move pays."""
        name = self.pass_name
        self._placement_found = rb.applied_placement(self.runtime, counts.shape[1], self.topo).copy()
        if name == "update":
            if self._deferred_placement is not None:   # the log-prob pass's, reported as its move
                placement, self._deferred_placement = self._deferred_placement, None
                moved, ms = self._apply_placement(placement)
                self._metrics["relibra/logprob/moved_experts"] = float(moved)
                self._metrics["relibra/logprob/placement_ms"] = ms
            return
        if not self.cfg.reorders or (name == "ref" and self.role != "ref"):
            return
        due = self.passes_run % self.cfg.reorder_every == 0   # every reorder_every batches
        self.passes_run += 1
        if not due:
            return
        current = rb.applied_placement(self.runtime, counts.shape[1], self.topo)
        replication, reorder = ((self.replication_fwd, self.reorder_fwd) if self.role == "ref"
                                else (self.replication, self.reorder))
        # in the planning process, where the planner is compiled (warmed up at attach)
        job = _submit(_plan_next_placement, counts, self.topo, current, replication, reorder,
                      self._preferred_nodes(counts.shape[1]))
        placement, ms = _timed(job.result)
        self._metrics["relibra/placement_plan_ms"] = ms
        if self.role == "actor":
            self._placed_by_logprob = True          # the update keeps this placement
            self._next_future, self._next_placement = None, None
            if getattr(self.engine, "_is_offload_optimizer", False):
                self._deferred_placement = placement  # optimizer state is on the host now
                return
        moved, ms = self._apply_placement(placement)
        self._metrics["relibra/moved_experts"] = float(moved)
        self._metrics["relibra/placement_ms"] = ms

    def _preferred_nodes(self, L: int) -> np.ndarray | None:
        """The driver's expert -> node hint for this batch ([L, E], `data_placement: locality`: the nodes its
        sequences were co-placed with) where it fits this engine, else None (a hint that does not fit is
        said once and counted in relibra/node_hint_ignored)."""
        if self._node_hint is None:
            return None
        topo = self.topo
        # the driver numbers nodes r // gpus_per_node over the EP ranks
        if not np.array_equal(np.asarray(topo.node_of_rank), np.arange(topo.G) // topo.ranks_per_node):
            reason = "the EP ranks' hosts are not in rank order, so the driver's node numbers do not apply"
        else:
            try:
                hint = check_node_of_expert(self._node_hint, L, topo.E, topo.num_nodes, "the hint")
            except PlanError as exc:
                reason = str(exc)
            else:
                self._metrics["relibra/node_hint_ignored"] = 0.0
                return hint
        rb._warn_once(f"hint:{reason}", f"the driver's expert-node hint is ignored: {reason}")
        self._metrics["relibra/node_hint_ignored"] = 1.0
        return None

    def _apply_placement(self, placement: np.ndarray) -> tuple[int, float]:
        """Move to `placement` (the actor's with its optimizer state, the ref's weights only): (experts whose
        home rank changed, wall ms)."""
        t0 = time.perf_counter()
        current = rb.applied_placement(self.runtime, placement.shape[0], self.topo)
        if (placement == current).all():
            return 0, 0.0
        optimizer = getattr(self.engine, "optimizer", None) if self.role == "actor" else None
        moved = rb.apply_placement(self.runtime, placement, optimizer=optimizer) or 0
        return moved, (time.perf_counter() - t0) * 1e3

    def _complete_plan(self) -> None:
        """Install the rest of the mini-batch's replicas (planned in the background) on every EP rank. A
        planning error surfaces here on every rank alike (all plan from the same gathered counts)."""
        future, self._rest_future = self._rest_future, None
        try:
            rest, ms = future.result()
            plan = self.plan.followed_by(rest)
        except Exception as exc:
            # the other ranks are entering extend_plan's agreement: join it with the error, so that every
            # rank raises it instead of waiting for this one (a failure on one rank only, e.g. memory)
            rb.extend_plan(self.runtime, None, error=f"{type(exc).__name__}: {exc}")
            raise
        rb.extend_plan(self.runtime, plan)
        self.plan = plan
        if self.cfg.metrics:
            self._metrics["relibra/plan_ms_background"] = ms
            self._plan_metrics()

    def _plan_metrics(self) -> None:
        counts, M = self._counts, self._counts.shape[0]
        static = _static_plan(self.topo, self._found(), M)
        self._metrics.update({
            "relibra/imbalance_before": imbalance(plan_outcome(static, counts)[0]),
            "relibra/imbalance_after": imbalance(plan_outcome(self.plan, counts)[0]),
            "relibra/replicas": float((self.plan.replica_expert >= 0).sum()) / max(1, M),
        })

    def _found(self) -> np.ndarray:
        """[L, E] the placement this pass started from (before any placement it applied)."""
        return self._placement_found if self._placement_found is not None else self.plan.expert_at_home

    @property
    def next_placement(self) -> np.ndarray | None:
        """[L, E] the placement to apply after the optimizer step (waits for its plan), or None."""
        if self._next_future is not None:
            future, self._next_future = self._next_future, None
            self._next_placement = future.result()
        return self._next_placement

    def _reorder_due(self) -> bool:
        return (self.optimizer_steps % self.cfg.reorder_every) == 0

    def _all_gather(self, local: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(local))
        G = self.topo.G
        if G == 1 or not torch.distributed.is_initialized():
            return local[None]
        dev = _collective_device(self.ep_group)
        out = [torch.empty_like(t, device=dev) for _ in range(G)]
        torch.distributed.all_gather(out, t.to(dev), group=self.ep_group)
        return torch.stack(out).cpu().numpy()

    def on_forward(self, batch, output=None) -> None:
        """Before a micro-batch's forward (output None) and, via a grad hook, before its backward."""
        m = _mb_index(batch)
        if m is None and self.plan is not None and self.runtime is not None and output is None:
            self._unknown_micro_batch()
        if m is None or self.plan is None or self.runtime is None:
            return
        if m >= self.plan.num_micro_batches and self._rest_future is not None:
            self._complete_plan()
        rb.set_micro_batch(self.runtime, m)

    def _unknown_micro_batch(self) -> None:
        """A forward whose micro-batch carries no relibra index: it runs on whatever plan is installed (exact,
        balance unknown); counted, or an error in strict mode."""
        reason = "micro-batch without relibra's index: it ran on the previously selected plan"
        if self.cfg.strict:
            raise RelibraError(f"relibra: {reason} (actor_rollout_ref.relibra.on_missing_routing=error)")
        rb._warn_once("fallback:unknown-micro-batch", f"{reason}; counted in relibra/fallbacks")
        self.fallbacks_total += 1
        for key in ("relibra/fallbacks", f"relibra/fallbacks/{_reason_key(reason)}"):
            self._metrics[key] = self._metrics.get(key, 0.0) + 1.0

    def _measured_metrics(self) -> dict:
        """Balance as executed: the tokens each physical slot computed this mini-batch, read from the runtime
        once at its end (an all-gather over EP, entered by every EP rank alike). Both imbalances count every
        computed pair (also those left to the live router, which the plan-based `*_planned` figures omit)."""
        read = getattr(self.runtime, "executed_tokens", None)
        if not self.cfg.metrics or self.plan is None or read is None:
            return {}
        executed = read()  # [M, L, G, S+R]
        M = min(executed.shape[0], self.plan.num_micro_batches)
        executed = executed[:M]
        G, S, E = self.topo.G, self.topo.S, self.topo.E
        # the same tokens per logical expert (home slots by the applied placement, replicas by the plan) ...
        eah = self.plan.expert_at_home                                      # [L, E] expert in each home slot
        L = eah.shape[0]
        per_expert = np.zeros((M, L, E), dtype=np.int64)
        for l in range(L):
            per_expert[:, l, eah[l]] = executed[:, l, :, :S].reshape(M, G * S)
            rep = self.plan.replica_expert[:M, l]                          # [M, G, R]
            m, r, k = np.nonzero(rep >= 0)
            np.add.at(per_expert[:, l], (m, rep[m, r, k]), executed[m, l, r, S + k])
        # ... each computed at its home rank on the placement the pass found: the balance without relibra's
        # work on this batch (no replicas, no placement applied for it)
        found = self._found()
        static = np.stack([per_expert[:, l, found[l]].reshape(M, G, S).sum(-1) for l in range(L)], axis=1)
        return {"relibra/imbalance_before": imbalance(static), "relibra/imbalance_after": imbalance(executed.sum(-1)),
                "relibra/imbalance_before_planned": self._metrics.get("relibra/imbalance_before", float("nan")),
                "relibra/imbalance_after_planned": self._metrics.get("relibra/imbalance_after", float("nan")),
                "relibra/replica_tokens": float(executed[..., S:].sum())}

    def finish(self, output) -> None:
        """relibra/* metrics (one value per mini-batch) into verl's metrics dict on the output ranks; a
        forward-only pass's (relibra/<pass>/*) are kept for the next update's first mini-batch."""
        measured = self._measured_metrics()  # collective: before any rank-dependent return
        if not self.cfg.metrics:
            return
        values = {**self._metrics, **measured}
        if self.pass_name != "update":
            if values:
                values.setdefault("relibra/fallbacks", 0.0)
                _pending_pass_metrics.update({_pass_key(k, self.pass_name): float(v) for k, v in values.items()})
            return
        if not isinstance(output, dict) or output.get("metrics") is None:
            return
        metrics = output["metrics"]
        if values:
            values.setdefault("relibra/fallbacks", 0.0)
        values.update(_pending_pass_metrics)
        _pending_pass_metrics.clear()
        for key, val in values.items():
            metrics[key] = [float(val)]

    def add_step_metrics(self, output) -> None:
        """relibra/moved_experts of the reorder applied after this mini-batch's optimizer step."""
        if self.cfg.metrics and isinstance(output, dict) and output.get("metrics") is not None:
            output["metrics"]["relibra/moved_experts"] = [float(self._moved_last)]

    def after_optimizer_step(self, engine) -> None:
        self.optimizer_steps += 1
        self._moved_last = 0
        placement, self._next_placement = self.next_placement, None
        if placement is None:
            return
        current = rb.applied_placement(self.runtime, placement.shape[0], self.topo)
        if (placement == current).all():
            return
        moved = rb.apply_placement(self.runtime, placement, optimizer=getattr(engine, "optimizer", None))
        self._moved_last = moved or 0

    def export_context(self):
        return rb.canonical_export(self.runtime, getattr(self.engine, "optimizer", None))


def forward_only_profile(profile, *, weights_only: bool):
    """The hardware profile a forward-only pass plans with: no backward GEMMs and no replica gradient to
    return; weights_only (the ref model, no optimizer): a move migrates the weights only."""
    import dataclasses

    changes = {"bwd_compute_factor": 0.0, "grad_bytes_per_param": 0.0}
    if weights_only:
        changes["state_bytes_per_param"] = profile.weight_bytes_per_param
    return dataclasses.replace(profile, **changes)


def _pass_key(key: str, pass_name: str) -> str:
    """relibra/x -> relibra/<pass>/x (the update's keys stay relibra/x)."""
    return key if pass_name == "update" else key.replace("relibra/", f"relibra/{pass_name}/", 1)


def _static_plan(topo: Topology, placement: np.ndarray, M: int) -> BatchPlan:
    """The plan that changes nothing: `placement`, no replicas."""
    L = placement.shape[0]
    return BatchPlan(topo, placement, np.full((M, L, topo.G, topo.R), -1, dtype=np.int64),
                     np.zeros((M, L, topo.G, topo.R, topo.G), dtype=np.int64), np.zeros(L, dtype=np.int64))


def _reason_key(reason: str) -> str:
    """A metric-name slug of a fallback reason: its words before any detail in parentheses or after a colon."""
    import re

    head = reason.split("(")[0].split(":")[0].lower()
    return re.sub(r"[^a-z0-9]+", "_", head).strip("_")[:48] or "other"


def _non_tensor(data, key: str):
    """A non-tensor entry verl put in the call's TensorDict (DataProto.meta_info, KVBatchMeta.extra_info)."""
    try:
        from verl.utils import tensordict_utils as tu

        return tu.get_non_tensor_data(data, key=key, default=None)
    except Exception:
        return None


def _mb_index(batch):
    try:
        from verl.utils import tensordict_utils as tu

        return tu.get_non_tensor_data(batch, key=MB_KEY, default=None)
    except Exception:
        return None


def _collective_device(group) -> str:
    try:
        backend = torch.distributed.get_backend(group)
    except Exception:
        backend = "gloo"
    return "cpu" if backend == "gloo" else f"cuda:{torch.cuda.current_device()}"
