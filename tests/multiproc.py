"""Run a test body in N gloo processes (torch.multiprocessing, spawn) and collect failures."""

from __future__ import annotations

import os
import sys
import threading
import traceback

import torch.multiprocessing as mp

from nemo_elastic.runtime import find_free_port


def _entry(rank: int, world_size: int, port: int, fn, args, errors, finished) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        fn(rank, world_size, *args)
        import torch.distributed as dist

        if dist.is_initialized():  # a body that left its group up: the same teardown as ours
            from nemo_elastic import runtime

            runtime.destroy()
    except BaseException:  # report every failure to the parent, whatever its type
        errors.put((rank, traceback.format_exc()))
        finished.abort()  # the other ranks need not wait for this one
        raise
    # Leave together, once every rank has torn down: a process that exits closes its sockets
    # under peers still tearing down.  Then skip interpreter finalization, where destructors of
    # torch's C++ threads have aborted a finished rank (SIGABRT, "terminate called without an
    # active exception") -- the body and its teardown have succeeded by then.
    try:
        finished.wait(timeout=300)
    except threading.BrokenBarrierError:
        pass  # another rank failed; it reports why
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_multiprocess(fn, world_size: int, *args) -> None:
    """`fn(rank, world_size, *args)` must be a module-level (picklable) function."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    finished = ctx.Barrier(world_size)
    port = find_free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors, finished))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            failures.append((-1, "process timed out"))
    if failures or any(p.exitcode != 0 for p in procs):
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failures)
        raise AssertionError(f"multi-process test failed (exit codes {[p.exitcode for p in procs]})\n{msg}")
