"""Run a test body in N gloo processes (torch.multiprocessing, spawn) and collect failures."""

from __future__ import annotations

import os
import sys
import threading
import time
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


TIMEOUT = 600.0  # seconds for the whole body on every rank
GRACE = 60.0  # after a rank failed: how long the others get to finish or report their own error
PORT_ATTEMPTS = 3  # a port that another process took between `find_free_port` and the bind


def run_multiprocess(fn, world_size: int, *args) -> None:
    """`fn(rank, world_size, *args)` must be a module-level (picklable) function.

    The rendezvous port is probed free and then bound by rank 0's store; another process (any
    gloo group binds ephemeral ports) can take it in between.  Then rank 0 fails with
    EADDRINUSE while its peers wait for a store that never comes: the ranks are stopped and the
    body runs again on a fresh port.  Any other failure is reported at once."""
    for attempt in range(PORT_ATTEMPTS):
        failures, codes = _run_once(fn, world_size, args)
        if attempt + 1 < PORT_ATTEMPTS and any("EADDRINUSE" in tb for _, tb in failures):
            continue
        break
    if failures or any(code != 0 for code in codes):
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in failures)
        raise AssertionError(f"multi-process test failed (exit codes {codes})\n{msg}")


def _run_once(fn, world_size: int, args) -> tuple[list, list]:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    finished = ctx.Barrier(world_size)
    port = find_free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors, finished))
             for r in range(world_size)]
    for p in procs:
        p.start()
    failures: list = []
    deadline = time.monotonic() + TIMEOUT
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        while not errors.empty():
            failures.append(errors.get())
        if any("EADDRINUSE" in tb for _, tb in failures):
            break  # no store: the peers can only wait
        if failures:  # the peers of a failed rank may wait for it forever
            deadline = min(deadline, time.monotonic() + GRACE)
        time.sleep(0.1)
    while not errors.empty():
        failures.append(errors.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            failures.append((-1, "stopped: still running after the timeout or a peer's failure"))
    return failures, [p.exitcode for p in procs]
