"""Spawn a few gloo ranks on this machine (tests and `relibra-verl verify`), never hanging.

`spawn_ranks(fn, world_size, *args, timeout=...)` runs `fn(rank, world_size, *args)` in `world_size` fresh
processes joined in one gloo group (file:// rendezvous, so no port is guessed) and returns the list of
their return values. A rank that raises makes the call raise `RankError` carrying every rank's message; a
run past `timeout` kills the ranks and raises `TimeoutError`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback


class RankError(RuntimeError):
    """One or more ranks raised. `.errors` maps rank -> (exception type name, message, traceback)."""

    def __init__(self, errors: dict[int, tuple[str, str, str]]):
        self.errors = errors
        lines = [f"rank {r}: {t}: {m}" for r, (t, m, _) in sorted(errors.items())]
        super().__init__("; ".join(lines) + "\n" + next(iter(errors.values()))[2])


def _child(fn, rank, world_size, init_file, q, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        q.put((rank, "ok", out))
    except BaseException as exc:  # report, then leave: the parent decides
        q.put((rank, "err", (type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def spawn_ranks(fn, world_size: int, *args, timeout: float = 120.0, error_grace: float = 10.0) -> list:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return their results by rank.

    fn and args must be picklable (module-level function). Raises RankError or TimeoutError.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    tmpdir = tempfile.mkdtemp(prefix="relibra_rdv_")
    init_file = os.path.join(tmpdir, "rdv")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # children start with one thread (2-core machines)
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, init_file, q, args), daemon=True)
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    results, errors = {}, {}
    first_error = 0.0
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            if errors:  # the others may be stuck in a collective: give them a short grace only
                deadline = min(deadline, first_error + error_grace)
            left = deadline - time.monotonic()
            if left <= 0 and errors:
                break
            if left <= 0:
                raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s "
                                   f"(finished: {sorted(results)}, failed: {sorted(errors)})")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) and q.empty():
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                            and r not in results and r not in errors]
                    for r in dead:
                        errors[r] = ("ProcessDied", f"exit code {procs[r].exitcode}", "")
                    if dead and not first_error:
                        first_error = time.monotonic()
                continue
            (results if status == "ok" else errors)[rank] = payload
            if status != "ok" and len(errors) == 1:
                first_error = time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        try:
            os.remove(init_file)
        except OSError:
            pass
        try:
            os.rmdir(tmpdir)
        except OSError:
            pass
    if errors:
        raise RankError(errors)
    return [results[r] for r in range(world_size)]
