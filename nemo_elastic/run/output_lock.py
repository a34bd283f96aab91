"""One writer per output folder: `extract`, `export`, `import-hf`, `prepare` hold a lock on the
folder they write, so a second command writing the same place refuses in one line instead of
both reporting success for a folder that holds only one's result.

The lock is `fcntl.flock` on a hidden sibling file `PARENT/.NAME.lock` (the output itself may
not exist yet, and is replaced by a rename): the kernel drops it when the process ends, even by
SIGKILL, so a lock is never stale.  The file holds the holder's pid and is removed on release
(a SIGKILLed holder leaves it, unlocked: harmless, reused by the next writer).

While the lock is held no other live writer of that output exists, so the hidden staging
folders a killed writer left next to it (`.NAME.export-*`, `.NAME.tmp`) are removed
(`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from nemo_elastic.errors import UserError, output_path_error

logger = logging.getLogger(__name__)


def lock_path(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out, field_name: str = "--out", *, error=UserError) -> Iterator[Path]:
    """Hold the write lock of output folder `out` (its parent is created if missing); a second
    holder in another process (or another lock in this one) gets `error` naming `field_name`."""
    out = Path(out)
    path = lock_path(out)
    created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    handle = _acquire(path, out, field_name, error)
    try:
        remove_stale_staging(out)
        yield out
    finally:
        # unlinked while still held (a writer that opened it meanwhile sees another inode and
        # retries on a fresh file), then released: no lock file is left behind
        with contextlib.suppress(OSError):
            os.unlink(path)
        handle.close()
        for folder in created:  # innermost first: only the folders made for the lock, if empty
            with contextlib.suppress(OSError):
                folder.rmdir()


def try_flock(handle) -> str | None:
    """Take an exclusive flock on open lock file `handle` without waiting: None when taken;
    else the holder's pid as the file records it ('unknown' if empty), and `handle` is closed."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        return holder


def write_pid(handle) -> None:
    """Record this process as the holder of the lock file `handle` (read by `try_flock`)."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()


def _acquire(path: Path, out: Path, field_name: str, error):
    for _ in range(100):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as err:
            raise error(str(output_path_error(field_name, out, err))) from None
        holder = try_flock(handle)
        if holder is not None:
            raise error(f"{field_name}={str(out)!r} is being written by another command (pid "
                        f"{holder}); wait for it to finish or choose another {field_name}")
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            write_pid(handle)
            return handle
        handle.close()  # the previous holder removed that file as we locked it: retry
    raise error(f"{field_name}={str(out)!r}: could not take its lock {str(path)!r}; retry")


@contextlib.contextmanager
def output_locks(outs, field_name: str = "--out", *, error=UserError) -> Iterator[None]:
    """`output_lock` on several folders (sorted: two commands never wait on each other)."""
    with contextlib.ExitStack() as stack:
        for out in sorted({Path(os.path.abspath(o)) for o in outs}):
            stack.enter_context(output_lock(out, field_name, error=error))
        yield


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging leftovers of killed writers of `out` (call with its lock held): the
    hidden `.NAME.export-*` and `.NAME.tmp` folders next to it and inside it."""
    out = Path(os.path.abspath(out))
    found = []
    for base in (out.parent, out):
        if not base.is_dir():
            continue
        found += [p for p in base.glob(f".{out.name}.export-*") if p.is_dir()]
        tmp = base / f".{out.name}.tmp"
        if tmp.is_dir():
            found.append(tmp)
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed %s, left by an interrupted writer of %s", path, out)
    return found
